"""Malformed configs, each with the dotted key and words its error must contain."""

MINIMAL = '[[targets]]\nname = "me"\nself = true\n'

BAD_CONFIGS = [
    ('[agent]\ninterval = "-1s"\n' + MINIMAL, "agent.interval", "positive duration"),
    (MINIMAL + 'interval = "-1s"\n', "targets[1].interval", 'must be a positive duration, got "-1s"'),
    (MINIMAL + "interval = 0\n", "targets[1].interval", "positive duration"),
    (MINIMAL + 'interval = "fast"\n', "targets[1].interval", '"fast"'),
    ('[agent]\nintervall = "1s"\n' + MINIMAL, "agent.intervall", "did you mean interval?"),
    (MINIMAL + 'cmdline = "([unclosed"\n', "targets[1].cmdline", "regular expression"),
    (MINIMAL + "pid = -4\n", "targets[1].pid", "at least 1"),
    (MINIMAL + 'pid = "12"\n', "targets[1].pid", "integer"),
    (MINIMAL + "full = 1\n", "targets[1].full", "true or false"),
    (MINIMAL + "chidren = true\n", "targets[1].chidren", "did you mean children?"),
    ('[[targets]]\nname = "x"\n', "targets[1]", "needs a selector"),
    ('[[targets]]\nself = true\n', "targets[1].name", "required"),
    (MINIMAL + MINIMAL, "targets[2].name", "used by another target"),
    ("[agent]\n", "targets", "at least one"),
    ("[targets]\nname = 'x'\n", "targets", "array of tables"),
    (MINIMAL + "[[sinks]]\nqueue = 3\n", "sinks[1].type", "required"),
    (MINIMAL + '[[sinks]]\ntype = "stdout"\nwhen_full = "explode"\n', "sinks[1].when_full", "one of"),
    (MINIMAL + '[[sinks]]\ntype = "stdout"\nqueue = 0\n', "sinks[1].queue", "at least 1"),
    (MINIMAL + '[[sinks]]\ntype = "stdout"\ntargets = ["mee"]\n', "sinks[1].targets",
     'no target named "mee"; did you mean me?'),
    ("[agent\n", "<config>", "not valid TOML"),
    ("[agent]\ntags = { env = [1] }\n" + MINIMAL, "agent.tags.env", "string"),
    ("[agent]\nhostname = ${NO_SUCH_VARIABLE_X}\n" + MINIMAL, "line 2", "${NO_SUCH_VARIABLE_X} is not set"),
    ("bogus = 1\n" + MINIMAL, "bogus", "unknown key"),
    (MINIMAL + 'all = true\n', "targets[1].all", "cannot be combined"),
]
