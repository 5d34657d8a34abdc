/* The compiled floor: peers.py's python-floor job, in C, to price what a compiled agent would
 * buy (see peers.py, kind "c-floor", which compiles and runs this).
 *
 *     c_floor INTERVAL OFFSET SECONDS RESCAN OUT
 *
 * One statm fd held per process, pread each tick; when the bytes are those of the last tick the
 * record's kept bytes are written again with the new seq and ts, otherwise parsed and formatted
 * (the fields of memagent's sample record, the name JSON-escaped); one write per tick; every
 * RESCAN seconds a readdir of /proc, one stat read per new pid. Ticks sit on multiples of
 * INTERVAL shifted by OFFSET; it runs SECONDS or until SIGTERM/SIGINT. No checks beyond what
 * keeps it correct: a floor. */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int pid, fd;
    char last[128];
    ssize_t last_len;
    char tail[512]; /* the record after "ts":"...", */
    int tail_len;
    char fixed[320]; /* "host":...,"os":"linux" */
} Held;

static Held *held;
static size_t count, capacity;
static unsigned char *present; /* one bit per pid: held */
static long pid_max, page;
static char host[256];
static volatile sig_atomic_t stopping;

static void on_signal(int signum) { (void)signum; stopping = 1; }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int json_escaped(char *out, size_t room, const char *in, size_t len) {
    size_t n = 0;
    for (size_t i = 0; i < len && n + 7 < room; i++) {
        unsigned char c = (unsigned char)in[i];
        if (c == '"' || c == '\\') { out[n++] = '\\'; out[n++] = (char)c; }
        else if (c < 0x20) n += (size_t)snprintf(out + n, room - n, "\\u%04x", c);
        else out[n++] = (char)c;
    }
    return (int)n;
}

static void hold(int pid) {
    char path[64], stat[4096], name[128];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int sfd = open(path, O_RDONLY | O_CLOEXEC);
    if (sfd < 0) return;
    ssize_t got = read(sfd, stat, sizeof stat - 1);
    close(sfd);
    if (got <= 0) return;
    stat[got] = 0;
    char *open_paren = strchr(stat, '('), *close_paren = strrchr(stat, ')');
    if (!open_paren || !close_paren || close_paren < open_paren) return;
    snprintf(path, sizeof path, "/proc/%d/statm", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    if (count == capacity) {
        capacity = capacity ? capacity * 2 : 1024;
        held = realloc(held, capacity * sizeof *held);
    }
    Held *h = &held[count++];
    h->pid = pid; h->fd = fd; h->last_len = -1;
    int name_len = json_escaped(name, sizeof name, open_paren + 1, (size_t)(close_paren - open_paren - 1));
    snprintf(h->fixed, sizeof h->fixed, "\"host\":\"%s\",\"target\":\"all\",\"pid\":%d,\"name\":\"%.*s\",\"os\":\"linux\"",
             host, pid, name_len, name);
    present[pid / 8] |= (unsigned char)(1 << (pid % 8));
}

static void release(size_t i) {
    close(held[i].fd);
    present[held[i].pid / 8] &= (unsigned char)~(1 << (held[i].pid % 8));
    held[i] = held[--count];
}

static void rescan(void) {
    DIR *proc = opendir("/proc");
    if (!proc) return;
    struct dirent *entry;
    while ((entry = readdir(proc))) {
        if (!isdigit((unsigned char)entry->d_name[0])) continue;
        long pid = strtol(entry->d_name, NULL, 10);
        if (pid <= 0 || pid >= pid_max || present[pid / 8] & (1 << (pid % 8))) continue;
        hold((int)pid);
    }
    closedir(proc);
}

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: c_floor INTERVAL OFFSET SECONDS RESCAN OUT\n"); return 2; }
    double interval = atof(argv[1]), offset = atof(argv[2]), seconds = atof(argv[3]), every = atof(argv[4]);
    int out = open(argv[5], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    if (out < 0) { perror(argv[5]); return 1; }
    FILE *max_file = fopen("/proc/sys/kernel/pid_max", "r");
    if (!max_file || fscanf(max_file, "%ld", &pid_max) != 1) pid_max = 4194304;
    if (max_file) fclose(max_file);
    present = calloc((size_t)pid_max / 8 + 1, 1);
    page = sysconf(_SC_PAGESIZE);
    gethostname(host, sizeof host);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    size_t buffer_size = 1 << 20, used;
    char *buffer = malloc(buffer_size);
    unsigned long long seq = 0;
    double end = now() + seconds, next_rescan = 0;
    double slot = interval > 0 ? floor((now() - offset) / interval) + 1 : 0;
    while (!stopping && now() < end) {
        if (interval > 0) {
            double wait = slot * interval + offset - now();
            if (wait > 0) {
                struct timespec pause = {(time_t)wait, (long)((wait - (time_t)wait) * 1e9)};
                if (nanosleep(&pause, NULL) != 0) continue; /* a signal: check stopping */
            }
            slot = fmax(slot + 1, floor((now() - offset) / interval) + 1);
        }
        double tick = now();
        if (tick >= next_rescan) { rescan(); next_rescan = tick + every; }
        time_t whole = (time_t)tick;
        struct tm utc;
        gmtime_r(&whole, &utc);
        char ts[40];
        size_t ts_len = strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &utc);
        ts_len += (size_t)snprintf(ts + ts_len, sizeof ts - ts_len, ".%06ldZ", (long)((tick - whole) * 1e6));
        used = 0;
        for (size_t i = 0; i < count;) {
            Held *h = &held[i];
            char raw[128];
            ssize_t got = pread(h->fd, raw, sizeof raw - 1, 0);
            if (got < 0) { release(i); continue; }
            if (got != h->last_len || memcmp(raw, h->last, (size_t)got) != 0) {
                raw[got] = 0;
                char *rest;
                long size = strtol(raw, &rest, 10), resident = strtol(rest, NULL, 10);
                memcpy(h->last, raw, (size_t)got);
                h->last_len = got;
                h->tail_len = snprintf(h->tail, sizeof h->tail,
                                       "\"schema\":1,\"type\":\"sample\",%s,\"portable\":{\"rss\":%ld,\"vms\":%ld}}",
                                       h->fixed, resident * page, size * page);
            }
            if (used + (size_t)h->tail_len + 96 > buffer_size) {
                buffer_size *= 2;
                buffer = realloc(buffer, buffer_size);
            }
            used += (size_t)snprintf(buffer + used, buffer_size - used, "{\"seq\":%llu,\"ts\":\"%.*s\",%.*s\n",
                                     ++seq, (int)ts_len, ts, h->tail_len, h->tail);
            i++;
        }
        if (used && write(out, buffer, used) < 0) { perror("write"); return 1; }
    }
    return 0;
}
