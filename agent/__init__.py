"""memagent: process-memory telemetry agent."""
