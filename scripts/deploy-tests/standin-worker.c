/* A stand-in for the CUDA build of ablate-worker, for the deploy kit's tests (scripts/test-deploy.sh).
 *
 * Built with -nostdlib and linked against stand-in CUDA libraries (standin-lib.c), so it needs no
 * glibc symbol at all and starts in any root file system (the tests run it in a Debian 11 root,
 * whose glibc is older than this machine's), but the dynamic loader still has to find every
 * library it names, exactly as for the real binary: `ldd` reports them "not found" until
 * bootstrap.sh installs them and sets LD_LIBRARY_PATH.
 *
 *   --version          print a version line, exit 0
 *   --token-file PATH  must be readable (else exit 3), as the real worker reads it at start
 *   anything else      wait for a signal (SIGTERM ends it), like a worker waiting for trials
 */
typedef unsigned long size_t;

static long sys3(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}

static size_t len(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}

static int eq(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}

static void say(const char *s) { sys3(1, 2, (long)s, (long)len(s)); }

/* The stand-in libraries' functions: calling them proves each one was loaded. */
extern int ablate_standin_lib(void);

__attribute__((noreturn)) static void quit(int code) {
    for (;;) sys3(60, code, 0, 0);
}

__attribute__((noreturn, used)) void standin_main(long *sp) {
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    int loaded = ablate_standin_lib();
    for (long i = 1; i < argc; i++) {
        if (eq(argv[i], "--version")) {
            const char *v = "ablate-worker 0.0.0-standin\n";
            sys3(1, 1, (long)v, (long)len(v));
            quit(loaded == 0 ? 0 : 4);
        }
        if (eq(argv[i], "--token-file") && i + 1 < argc) {
            long fd = sys3(2, (long)argv[i + 1], 0 /* O_RDONLY */, 0);
            if (fd < 0) {
                say("ablate-worker (stand-in): cannot read the token file ");
                say(argv[i + 1]);
                say("\n");
                quit(3);
            }
            char c;
            if (sys3(0, fd, (long)&c, 1) != 1) quit(3);
            sys3(3, fd, 0, 0);
        }
    }
    for (;;) sys3(34 /* pause */, 0, 0, 0);
}

__asm__(".text\n.globl _start\n_start:\n xor %rbp, %rbp\n mov %rsp, %rdi\n and $-16, %rsp\n call standin_main\n hlt\n");
