/*
 * The physical limits of this machine for what colo-blk does, measured with
 * plain system calls and nothing else (bench/limits.ts builds and runs it).
 *
 *   limits memcpy MIB                   memcpy in 1 MiB pieces between two 256 MiB buffers
 *                                       (larger than any cache: memory to memory)
 *   limits write FILE MIB               pwrite(2) of 1 MiB chunks over FILE (wrapping at its size)
 *   limits sink PORT FILE               accept one connection; recv 1 MiB at a time,
 *                                       pwrite it to FILE (or drop it: FILE "-")
 *   limits relay PORT FILE [PEER]       as sink, and also send every chunk on to
 *                                       127.0.0.1:PEER (a primary replicating)
 *   limits send PORT MIB                connect and send MIB 1 MiB chunks, then wait for EOF
 *
 * Each prints one JSON line: {"bytes":B,"seconds":S,"cpuSeconds":C}, CPU from
 * getrusage(2) over the measured part only (user + system). Everything binds
 * and connects to 127.0.0.1. A failed call prints its errno and exits 1; a
 * run still going after 120 s is ended by SIGALRM.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1L << 20)

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static double cpu(void) {
  struct rusage r;
  getrusage(RUSAGE_SELF, &r);
  return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

static void die(const char *what) {
  fprintf(stderr, "limits: %s: %s\n", what, strerror(errno));
  exit(1);
}

static void report(long bytes, double t0, double c0) {
  printf("{\"bytes\":%ld,\"seconds\":%.6f,\"cpuSeconds\":%.6f}\n", bytes, now() - t0, cpu() - c0);
}

static struct sockaddr_in loopback(int port) {
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return a;
}

/* Listen on 127.0.0.1:PORT and take one connection. */
static int accept_one(int port) {
  int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  if (l < 0) die("socket");
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = loopback(port);
  if (bind(l, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
  if (listen(l, 1) < 0) die("listen");
  int s = accept(l, NULL, NULL);
  if (s < 0) die("accept");
  close(l);
  return s;
}

/* Connect to 127.0.0.1:PORT, retrying for up to 5 s while it is not listening yet. */
static int connect_to(int port) {
  struct sockaddr_in a = loopback(port);
  for (int i = 0; i < 500; i++) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) die("socket");
    if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) return s;
    close(s);
    usleep(10000);
  }
  die("connect");
  return -1;
}

static void send_all(int s, const char *b, long n) {
  for (long w = 0; w < n;) {
    long k = write(s, b + w, n - w);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) die("send");
    w += k;
  }
}

/* Up to CHUNK bytes (fewer only at the end of the stream). */
static long recv_chunk(int s, char *b) {
  long r = 0;
  while (r < CHUNK) {
    long k = read(s, b + r, CHUNK - r);
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) die("recv");
    if (k == 0) break;
    r += k;
  }
  return r;
}

static int open_target(const char *file, long *size) {
  if (!strcmp(file, "-")) return -1;
  int fd = open(file, O_WRONLY);
  if (fd < 0) die(file);
  struct stat st;
  if (fstat(fd, &st) < 0) die("fstat");
  *size = st.st_size < CHUNK ? CHUNK : st.st_size / CHUNK * CHUNK;
  return fd;
}

/* Write at `pos` modulo the file's size; nothing without a file. */
static void write_at(int fd, const char *b, long n, long pos, long size) {
  if (fd >= 0 && pwrite(fd, b, n, pos % size) != n) die("pwrite");
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: limits memcpy|write|sink|relay|send ...\n");
    return 2;
  }
  const char *mode = argv[1];
  alarm(120); /* a peer that never comes (a failed start) must not leave this waiting in accept */
  char *buf = malloc(CHUNK), *other = malloc(CHUNK);
  if (!buf || !other) die("malloc");
  memset(buf, 0x5a, CHUNK);
  memset(other, 0xa5, CHUNK);

  if (!strcmp(mode, "memcpy")) {
    long total = atol(argv[2]) << 20, span = 256L << 20;
    char *from = malloc(span), *to = malloc(span);
    if (!from || !to) die("malloc");
    memset(from, 0x5a, span); /* touched before the clock starts: no page faults measured */
    memset(to, 0xa5, span);
    double t0 = now(), c0 = cpu();
    for (long d = 0; d < total; d += CHUNK) {
      memcpy(to + d % span, from + d % span, CHUNK);
      __asm__ volatile("" : : "r"(to) : "memory");
    }
    report(total, t0, c0);
    return 0;
  }
  if (!strcmp(mode, "write") && argc >= 4) {
    long size = 0, total = atol(argv[3]) << 20;
    int fd = open_target(argv[2], &size);
    double t0 = now(), c0 = cpu();
    for (long d = 0; d < total; d += CHUNK) write_at(fd, buf, CHUNK, d, size);
    report(total, t0, c0);
    return 0;
  }
  if (!strcmp(mode, "send")) {
    long total = argc >= 4 ? atol(argv[3]) << 20 : 0;
    int s = connect_to(atoi(argv[2]));
    double t0 = now(), c0 = cpu();
    for (long d = 0; d < total; d += CHUNK) send_all(s, buf, CHUNK);
    shutdown(s, SHUT_WR);
    (void)recv_chunk(s, other); /* the other end closes once it has everything */
    report(total, t0, c0);
    return 0;
  }
  if ((!strcmp(mode, "sink") || !strcmp(mode, "relay")) && argc >= 4) {
    long size = 0, done = 0;
    int fd = open_target(argv[3], &size);
    int peer = !strcmp(mode, "relay") && argc >= 5 ? connect_to(atoi(argv[4])) : -1;
    int s = accept_one(atoi(argv[2]));
    double t0 = now(), c0 = cpu();
    for (;;) {
      long n = recv_chunk(s, buf);
      if (n <= 0) break;
      write_at(fd, buf, n, done, size);
      if (peer >= 0) send_all(peer, buf, n);
      done += n;
    }
    if (peer >= 0) {
      shutdown(peer, SHUT_WR);
      (void)recv_chunk(peer, other);
    }
    report(done, t0, c0);
    close(s);
    return 0;
  }
  fprintf(stderr, "limits: unknown mode or missing arguments: %s\n", mode);
  return 2;
}
