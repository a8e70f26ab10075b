/*
 * The process the benchmark migrates. Unaware of umig: it only fills memory, runs a
 * timestamp loop and checks its memory when asked.
 *
 *   workload DIR idle   SIZE_MIB               SIZE_MIB filled with a known pattern
 *   workload DIR writer SIZE_MIB RATE_MIB_S    ... and RATE_MIB_S rewritten at random pages
 *   workload DIR sparse VIRT_MIB TOUCH_MIB     a MAP_NORESERVE mapping, TOUCH_MIB of it used
 *
 * Once filled it writes DIR/ready. Its loop reads CLOCK_MONOTONIC about every millisecond
 * and keeps the longest gap between two iterations: a frozen process cannot iterate, so
 * that gap is how long it was frozen, by its own clock (source and target share one host,
 * hence one clock). On SIGUSR1 it checks every page it owns and writes DIR/result as
 * "ok|bad key=value ...", with the longest gap since the previous report; then the gap
 * starts over, so the check itself never counts as a freeze.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS_PER_PAGE (PAGE / sizeof(uint64_t))
#define NAP_NS 1000000L
/* After a freeze the writer resumes at its rate instead of catching up in one burst,
   which would lengthen the first iteration after the freeze and blur the measurement. */
#define MAX_WRITE_BACKLOG_NS 10000000LL

static volatile sig_atomic_t report_requested;

static void on_usr1(int sig)
{
    (void)sig;
    report_requested = 1;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Depends on the page, the word and how often the page was rewritten: a page copied
   before its last rewrite, or only partly, does not match. */
static uint64_t pattern(uint64_t page, uint64_t word, uint64_t gen)
{
    uint64_t x = (page * WORDS_PER_PAGE + word + 1) * 0x9E3779B97F4A7C15ull;
    x ^= (gen + 1) * 0xC2B2AE3D27D4EB4Full;
    return x ^ (x >> 29);
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void put_file(const char *dir, const char *name, const char *text)
{
    char tmp[4096], path[4096];
    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, name);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    size_t len = strlen(text);
    while (len > 0) {
        ssize_t n = write(fd, text, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        text += n;
        len -= (size_t)n;
    }
    close(fd);
    rename(tmp, path); /* the reader never sees half a file */
}

struct region {
    uint64_t *mem;
    uint64_t npages;   /* pages mapped */
    uint64_t nused;    /* pages holding data */
    uint64_t stride;   /* used page k is page k * stride */
    uint32_t *gen;     /* rewrites per used page (writer only) */
};

static void fill_page(struct region *r, uint64_t k)
{
    uint64_t page = k * r->stride, gen = r->gen ? r->gen[k] : 0;
    uint64_t *p = r->mem + page * WORDS_PER_PAGE;
    for (uint64_t w = 0; w < WORDS_PER_PAGE; w++)
        p[w] = pattern(page, w, gen);
}

/* Returns the number of wrong pages; *first gets the first one's index. */
static uint64_t check(struct region *r, uint64_t *first)
{
    uint64_t bad = 0;
    for (uint64_t k = 0; k < r->nused; k++) {
        uint64_t page = k * r->stride, gen = r->gen ? r->gen[k] : 0;
        const uint64_t *p = r->mem + page * WORDS_PER_PAGE;
        for (uint64_t w = 0; w < WORDS_PER_PAGE; w++) {
            if (p[w] != pattern(page, w, gen)) {
                if (bad++ == 0)
                    *first = page;
                break;
            }
        }
    }
    /* A sparse mapping's holes must still read as zeros; sample the middle of some. */
    if (r->stride > 1) {
        uint64_t step = r->nused > 64 ? r->nused / 64 : 1;
        for (uint64_t k = 0; k + 1 < r->nused; k += step) {
            uint64_t page = k * r->stride + r->stride / 2;
            if (r->mem[page * WORDS_PER_PAGE] != 0) {
                if (bad++ == 0)
                    *first = page;
            }
        }
    }
    return bad;
}

static int usage(const char *argv0)
{
    fprintf(stderr, "usage: %s DIR idle SIZE_MIB | DIR writer SIZE_MIB RATE_MIB_S | "
                    "DIR sparse VIRT_MIB TOUCH_MIB\n", argv0);
    return 2;
}

int main(int argc, char **argv)
{
    if (argc < 4)
        return usage(argv[0]);
    const char *dir = argv[1], *kind = argv[2];
    struct region r = { 0 };
    double rate = 0; /* bytes per nanosecond */
    uint64_t map_bytes;
    int flags = MAP_PRIVATE | MAP_ANONYMOUS;

    if (strcmp(kind, "idle") == 0 && argc == 4) {
        map_bytes = strtoull(argv[3], NULL, 10) << 20;
        r.nused = map_bytes / PAGE;
        r.stride = 1;
    } else if (strcmp(kind, "writer") == 0 && argc == 5) {
        map_bytes = strtoull(argv[3], NULL, 10) << 20;
        r.nused = map_bytes / PAGE;
        r.stride = 1;
        rate = strtod(argv[4], NULL) * 1048576.0 / 1e9;
    } else if (strcmp(kind, "sparse") == 0 && argc == 5) {
        map_bytes = strtoull(argv[3], NULL, 10) << 20;
        r.nused = (strtoull(argv[4], NULL, 10) << 20) / PAGE;
        if (r.nused == 0 || r.nused > map_bytes / PAGE)
            return usage(argv[0]);
        r.stride = map_bytes / PAGE / r.nused; /* spread over the whole range */
        flags |= MAP_NORESERVE;
    } else {
        return usage(argv[0]);
    }
    r.npages = map_bytes / PAGE;
    if (r.nused == 0)
        return usage(argv[0]);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL) < 0) {
        perror("sigaction");
        return 1;
    }
    r.mem = mmap(NULL, map_bytes, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (r.mem == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    if (rate > 0) {
        r.gen = calloc(r.nused, sizeof *r.gen);
        if (!r.gen) {
            perror("calloc");
            return 1;
        }
    }
    for (uint64_t k = 0; k < r.nused; k++)
        fill_page(&r, k);

    char msg[512];
    snprintf(msg, sizeof msg, "ready pid=%ld kind=%s pages=%llu mapped_pages=%llu\n",
             (long)getpid(), kind, (unsigned long long)r.nused, (unsigned long long)r.npages);
    put_file(dir, "ready", msg);

    uint64_t rng = 0x243F6A8885A308D3ull ^ (uint64_t)getpid();
    uint64_t writes = 0, iters = 0;
    int64_t last = now_ns(), max_gap = 0, gap_end = last, since = last;
    double write_credit = 0;
    for (;;) {
        int64_t t = now_ns(), gap = t - last;
        if (gap > max_gap) {
            max_gap = gap;
            gap_end = t;
        }
        if (rate > 0) {
            write_credit += (double)(gap < MAX_WRITE_BACKLOG_NS ? gap : MAX_WRITE_BACKLOG_NS) * rate;
            for (; write_credit >= PAGE; write_credit -= PAGE) {
                uint64_t k = xorshift(&rng) % r.nused;
                r.gen[k]++;
                fill_page(&r, k);
                writes++;
            }
        }
        last = t;
        iters++;

        if (report_requested) {
            report_requested = 0;
            uint64_t first = 0, bad = check(&r, &first);
            snprintf(msg, sizeof msg,
                     "%s pid=%ld kind=%s pages=%llu wrong_pages=%llu first_wrong_page=%llu "
                     "max_gap_ns=%lld gap_end_ns=%lld since_ns=%lld iterations=%llu "
                     "page_writes=%llu\n",
                     bad ? "bad" : "ok", (long)getpid(), kind, (unsigned long long)r.nused,
                     (unsigned long long)bad, (unsigned long long)first, (long long)max_gap,
                     (long long)gap_end, (long long)since, (unsigned long long)iters,
                     (unsigned long long)writes);
            put_file(dir, "result", msg);
            last = since = now_ns();
            max_gap = 0;
            gap_end = last;
            iters = 0;
        }
        struct timespec nap = { 0, NAP_NS };
        nanosleep(&nap, NULL); /* EINTR or not, the loop looks at the flag again */
    }
}
