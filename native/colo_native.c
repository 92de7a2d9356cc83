/*
 * colo_native: the few Linux file calls that Node's fs module lacks.
 *
 * - punchHole / zeroRange: fallocate(2) with FALLOC_FL_PUNCH_HOLE or
 *   FALLOC_FL_ZERO_RANGE, so TRIM and WRITE_ZEROES deallocate or zero a range
 *   without writing it.
 * - seekData / seekHole: lseek(2) with SEEK_DATA / SEEK_HOLE, so block status
 *   reports the holes of a sparse image.
 *
 * - copyRange: copy_file_range(2), so the secondary applies an epoch's
 *   journal to its image inside the kernel (one copy, no trip through JS);
 *   copyRangeAsync does it on a thread-pool thread.
 *
 * - crc32c: CRC-32C (Castagnoli) of a buffer, with the SSE4.2 instruction in
 *   three streams where the CPU has it (20-30 GB/s here; zlib's CRC-32 does
 *   ~2.7), so checksumming every replicated frame costs little on both sides.
 *
 * - mapShared / diffPages: a read-only view of a VM's RAM file (QEMU's
 *   memory-backend-file, share=on) and a page-by-page compare against the
 *   last checkpoint's copy, on several threads, that copies the changed pages
 *   into the copy and lists them: what a memory checkpoint must send.
 *
 * - sendFileReply: an NBD read reply straight from the image's page cache to
 *   the client's socket: send(2) of the reply header, then sendfile(2) of the
 *   data, non-blocking (it stops where the socket is full and says how far it
 *   got). Over TCP the kernel sends the file's pages by reference: no copy
 *   into a user buffer and none into the socket (see src/net/file-replies.ts).
 *
 * - tuneMalloc: glibc's mallopt(3), so freed memory stays in the heap for the
 *   next allocation instead of being given back (brk shrink) and faulted in
 *   again as fresh, zeroed pages (see src/sys/malloc.ts).
 *
 * The file calls are synchronous and take (fd, offset[, length]) as numbers.
 * Errors become JS Errors whose `code` is the errno name ("EOPNOTSUPP", ...),
 * so the TypeScript side can fall back when a filesystem lacks the feature.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <node_api.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

static const char *errno_name(int e) {
  switch (e) {
  case EOPNOTSUPP: return "EOPNOTSUPP";
  case ENOSPC: return "ENOSPC";
  case EIO: return "EIO";
  case EINVAL: return "EINVAL";
  case ENXIO: return "ENXIO";
  case EBADF: return "EBADF";
  case EPERM: return "EPERM";
  case EROFS: return "EROFS";
  case EFBIG: return "EFBIG";
  case EINTR: return "EINTR";
  case ENODEV: return "ENODEV";
  case EXDEV: return "EXDEV";
  case ENOSYS: return "ENOSYS";
  default: return "EIO";
  }
}

/* An Error whose code is the errno name and whose message is "what: strerror". */
static napi_value errno_error(napi_env env, int e, const char *what) {
  char msg[256];
  snprintf(msg, sizeof msg, "%s: %s", what, strerror(e));
  napi_value code, text, err;
  napi_create_string_utf8(env, errno_name(e), NAPI_AUTO_LENGTH, &code);
  napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &text);
  napi_create_error(env, code, text, &err);
  return err;
}

static napi_value throw_errno(napi_env env, int e, const char *what) {
  napi_throw(env, errno_error(env, e, what));
  return NULL;
}

static int get_args(napi_env env, napi_callback_info info, size_t want, int64_t *out) {
  napi_value argv[5];
  size_t argc = 5;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < want) {
    napi_throw_type_error(env, "EINVAL", "wrong number of arguments");
    return -1;
  }
  for (size_t i = 0; i < want; i++) {
    if (napi_get_value_int64(env, argv[i], &out[i]) != napi_ok) {
      napi_throw_type_error(env, "EINVAL", "arguments must be numbers");
      return -1;
    }
  }
  return 0;
}

static napi_value do_fallocate(napi_env env, napi_callback_info info, int mode, const char *what) {
  int64_t a[3];
  if (get_args(env, info, 3, a) < 0) return NULL;
  int r;
  do {
    r = fallocate((int)a[0], mode, (off_t)a[1], (off_t)a[2]);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return throw_errno(env, errno, what);
  return NULL;
}

static napi_value punch_hole(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, "fallocate(PUNCH_HOLE)");
}

static napi_value zero_range(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, "fallocate(ZERO_RANGE)");
}

static napi_value allocate_range(napi_env env, napi_callback_info info) {
  return do_fallocate(env, info, FALLOC_FL_KEEP_SIZE, "fallocate");
}

/* lseek with SEEK_DATA/SEEK_HOLE; returns -1 for ENXIO (no more data past offset). */
static napi_value do_seek(napi_env env, napi_callback_info info, int whence, const char *what) {
  int64_t a[2];
  if (get_args(env, info, 2, a) < 0) return NULL;
  off_t r = lseek((int)a[0], (off_t)a[1], whence);
  if (r < 0 && errno != ENXIO) return throw_errno(env, errno, what);
  napi_value out;
  napi_create_int64(env, r < 0 ? -1 : (int64_t)r, &out);
  return out;
}

static napi_value seek_data(napi_env env, napi_callback_info info) {
  return do_seek(env, info, SEEK_DATA, "lseek(SEEK_DATA)");
}

static napi_value seek_hole(napi_env env, napi_callback_info info) {
  return do_seek(env, info, SEEK_HOLE, "lseek(SEEK_HOLE)");
}

/* The copy of copyRange and copyRangeAsync: bytes copied go to *done (short at end of file); 0 or an errno. */
static int copy_loop(int fd_in, int64_t off_in, int fd_out, int64_t off_out, int64_t length, int64_t *done) {
  off64_t in = (off64_t)off_in, out = (off64_t)off_out;
  *done = 0;
  while (*done < length) {
    ssize_t r = copy_file_range(fd_in, &in, fd_out, &out, (size_t)(length - *done), 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (r == 0) break;
    *done += r;
  }
  return 0;
}

/* copy_file_range(fdIn, offIn, fdOut, offOut, length): copy inside the kernel; returns bytes copied. */
static napi_value copy_range(napi_env env, napi_callback_info info) {
  int64_t a[5], done;
  if (get_args(env, info, 5, a) < 0) return NULL;
  int e = copy_loop((int)a[0], a[1], (int)a[2], a[3], a[4], &done);
  if (e) return throw_errno(env, e, "copy_file_range");
  napi_value result;
  napi_create_int64(env, done, &result);
  return result;
}

/*
 * copyRangeAsync(fdIn, offIn, fdOut, offOut, length) -> Promise<bytes copied>:
 * copy_file_range on a libuv pool thread, so a secondary's apply never holds
 * its event loop (and the link frames queued behind it) for a chunk's copy.
 */
struct copy_work {
  napi_async_work work;
  napi_deferred deferred;
  int fd_in, fd_out;
  int64_t off_in, off_out, length, done;
  int err;
};

static void copy_execute(napi_env env, void *data) {
  (void)env;
  struct copy_work *w = data;
  w->err = copy_loop(w->fd_in, w->off_in, w->fd_out, w->off_out, w->length, &w->done);
}

/* Settle a pool copy's promise: the bytes copied, or the errno as an error naming `what`; the work is deleted. */
static void settle_copy(napi_env env, napi_status status, napi_async_work work, napi_deferred deferred, int err,
                        int64_t done, const char *what) {
  napi_value v;
  if (status != napi_ok || err) {
    napi_reject_deferred(env, deferred, errno_error(env, status != napi_ok ? ECANCELED : err, what));
  } else {
    napi_create_int64(env, done, &v);
    napi_resolve_deferred(env, deferred, v);
  }
  napi_delete_async_work(env, work);
}

static void copy_complete(napi_env env, napi_status status, void *data) {
  struct copy_work *w = data;
  settle_copy(env, status, w->work, w->deferred, w->err, w->done, "copy_file_range");
  free(w);
}

static napi_value copy_range_async(napi_env env, napi_callback_info info) {
  int64_t a[5];
  if (get_args(env, info, 5, a) < 0) return NULL;
  struct copy_work *w = calloc(1, sizeof *w);
  if (!w) return throw_errno(env, ENOMEM, "copyRangeAsync");
  w->fd_in = (int)a[0];
  w->off_in = a[1];
  w->fd_out = (int)a[2];
  w->off_out = a[3];
  w->length = a[4];
  napi_value promise, name;
  napi_create_promise(env, &w->deferred, &promise);
  napi_create_string_utf8(env, "colo:copyRange", NAPI_AUTO_LENGTH, &name);
  if (napi_create_async_work(env, NULL, name, copy_execute, copy_complete, w, &w->work) != napi_ok ||
      napi_queue_async_work(env, w->work) != napi_ok) {
    free(w);
    napi_throw_error(env, "EIO", "copyRangeAsync: cannot queue the copy");
    return NULL;
  }
  return promise;
}

/*
 * copyRangesAsync(fdIn, fdOut, ranges: Float64Array [posIn, posOut, length]*, count)
 *   -> Promise<bytes copied>
 * A batch of copies from one file to another on a libuv pool thread: a
 * secondary applies an epoch of thousands of small extents in a few calls,
 * not one call (and one turn of its event loop) per extent. Ranges must not
 * overlap in the source or in the destination (an epoch's merged extents).
 * Small ranges are read in source order, neighbours within a page of each
 * other in one pread of up to 1 MiB, then written one pwrite each (cheaper
 * than a copy_file_range per 4 KiB here); large ones are copied in the kernel,
 * or through the buffer where copy_file_range cannot.
 */
#define BATCH_SMALL (64 * 1024)
#define BATCH_BUF (1024 * 1024)
#define BATCH_GAP 4096

struct range3 {
  int64_t in, out, len;
};

struct ranges_work {
  napi_async_work work;
  napi_deferred deferred;
  int fd_in, fd_out;
  size_t count;
  struct range3 *r;
  int64_t done;
  int err;
};

static int cmp_in(const void *a, const void *b) {
  int64_t x = ((const struct range3 *)a)->in, y = ((const struct range3 *)b)->in;
  return x < y ? -1 : x > y;
}

static int pread_full(int fd, char *buf, int64_t len, int64_t pos) {
  int64_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd, buf + done, (size_t)(len - done), (off_t)(pos + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    if (n == 0) return EIO; /* the source ends inside a range */
    done += n;
  }
  return 0;
}

static int pwrite_full(int fd, const char *buf, int64_t len, int64_t pos) {
  int64_t done = 0;
  while (done < len) {
    ssize_t n = pwrite(fd, buf + done, (size_t)(len - done), (off_t)(pos + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    done += n;
  }
  return 0;
}

/* One large range: in the kernel, else through the buffer. */
static int copy_large(int fd_in, int fd_out, const struct range3 *r, char *buf) {
  int64_t done = 0;
  int e = copy_loop(fd_in, r->in, fd_out, r->out, r->len, &done);
  if (e == 0 && done == r->len) return 0;
  if (e && e != EXDEV && e != ENOSYS && e != EOPNOTSUPP && e != EINVAL) return e;
  if (e == 0 && done < r->len) return EIO; /* the source ends inside the range */
  while (done < r->len) {
    int64_t n = r->len - done < BATCH_BUF ? r->len - done : BATCH_BUF;
    if ((e = pread_full(fd_in, buf, n, r->in + done)) || (e = pwrite_full(fd_out, buf, n, r->out + done))) return e;
    done += n;
  }
  return 0;
}

static void ranges_execute(napi_env env, void *data) {
  (void)env;
  struct ranges_work *w = data;
  char *buf = malloc(BATCH_BUF);
  if (!buf) {
    w->err = ENOMEM;
    return;
  }
  qsort(w->r, w->count, sizeof *w->r, cmp_in);
  size_t i = 0;
  while (i < w->count && !w->err) {
    const struct range3 *a = &w->r[i];
    if (a->len > BATCH_SMALL) {
      w->err = copy_large(w->fd_in, w->fd_out, a, buf);
      if (!w->err) w->done += a->len;
      i++;
      continue;
    }
    /* A span of small ranges close together in the source, read at once. */
    size_t j = i + 1;
    int64_t end = a->in + a->len;
    while (j < w->count && w->r[j].len <= BATCH_SMALL && w->r[j].in >= end && w->r[j].in - end <= BATCH_GAP &&
           w->r[j].in + w->r[j].len - a->in <= BATCH_BUF) {
      end = w->r[j].in + w->r[j].len;
      j++;
    }
    w->err = pread_full(w->fd_in, buf, end - a->in, a->in);
    for (size_t k = i; k < j && !w->err; k++) {
      w->err = pwrite_full(w->fd_out, buf + (w->r[k].in - a->in), w->r[k].len, w->r[k].out);
      if (!w->err) w->done += w->r[k].len;
    }
    i = j;
  }
  free(buf);
}

static void ranges_complete(napi_env env, napi_status status, void *data) {
  struct ranges_work *w = data;
  settle_copy(env, status, w->work, w->deferred, w->err, w->done, "copyRanges");
  free(w->r);
  free(w);
}

/* A whole number in [0, 2^53]: converting NaN or an out-of-range double to an integer is undefined. */
static int whole(double x) { return x >= 0 && x <= 9007199254740992.0 && x == (double)(int64_t)x; }

static napi_value copy_ranges_async(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  size_t argc = 4;
  int64_t fd_in, fd_out, count;
  napi_typedarray_type type;
  size_t length;
  void *data;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 4 ||
      napi_get_value_int64(env, argv[0], &fd_in) != napi_ok || napi_get_value_int64(env, argv[1], &fd_out) != napi_ok ||
      napi_get_value_int64(env, argv[3], &count) != napi_ok ||
      napi_get_typedarray_info(env, argv[2], &type, &length, &data, NULL, NULL) != napi_ok ||
      type != napi_float64_array || count < 0 || (size_t)count * 3 > length) {
    napi_throw_type_error(env, "EINVAL", "copyRangesAsync(fdIn, fdOut, Float64Array of [posIn, posOut, length]*, count)");
    return NULL;
  }
  struct ranges_work *w = calloc(1, sizeof *w);
  struct range3 *r = malloc(((size_t)count ? (size_t)count : 1) * sizeof *r);
  if (!w || !r) {
    free(w);
    free(r);
    return throw_errno(env, ENOMEM, "copyRangesAsync");
  }
  for (int64_t k = 0; k < count; k++) {
    const double *t = (const double *)data + 3 * k;
    if (!whole(t[0]) || !whole(t[1]) || !whole(t[2])) {
      free(w);
      free(r);
      napi_throw_range_error(env, "EINVAL", "copyRangesAsync: a position or length that is not a whole number >= 0");
      return NULL;
    }
    r[k].in = (int64_t)t[0];
    r[k].out = (int64_t)t[1];
    r[k].len = (int64_t)t[2];
  }
  w->fd_in = (int)fd_in;
  w->fd_out = (int)fd_out;
  w->count = (size_t)count;
  w->r = r;
  napi_value promise, name;
  napi_create_promise(env, &w->deferred, &promise);
  napi_create_string_utf8(env, "colo:copyRanges", NAPI_AUTO_LENGTH, &name);
  if (napi_create_async_work(env, NULL, name, ranges_execute, ranges_complete, w, &w->work) != napi_ok ||
      napi_queue_async_work(env, w->work) != napi_ok) {
    free(w->r);
    free(w);
    napi_throw_error(env, "EIO", "copyRangesAsync: cannot queue the copy");
    return NULL;
  }
  return promise;
}

/* CRC-32C, reflected polynomial 0x82F63B78; crc32c(data, prev) continues from prev like zlib's crc32. */
static uint32_t crc32c_table[256];

static void crc32c_init(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    crc32c_table[i] = c;
  }
}

static uint32_t crc32c_soft(uint32_t crc, const uint8_t *p, size_t n) {
  crc = ~crc;
  while (n--) crc = crc32c_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return ~crc;
}

#if defined(__x86_64__)
/*
 * The crc32 instruction takes 3 cycles and can start one per cycle: one
 * stream of it runs at a third of the unit's pace. crc32c_hw runs three
 * streams over three adjacent blocks of L bytes and joins them: the register
 * after block A then block B is shift_L(after A) ^ (after B from 0), since
 * the register update is linear; shift_L (L zero bytes) is a lookup in tables
 * built at load time. Two block sizes: long buffers amortise the joins,
 * frames of a few KiB still get three streams.
 */
#define CRC_LONG 8192
#define CRC_SHORT 256
static uint32_t crc_long_shift[4][256], crc_short_shift[4][256];

static inline uint64_t load64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_zeros(uint32_t state, size_t n) {
  uint64_t c = state;
  for (size_t i = 0; i < n / 8; i++) c = _mm_crc32_u64(c, 0);
  return (uint32_t)c;
}

/* tab[k][b]: the register after n zero bytes from state b << 8k (the shift of any state XORs four of these). */
static void crc32c_shift_init(uint32_t tab[4][256], size_t n) {
  uint32_t bit[32];
  for (int i = 0; i < 32; i++) bit[i] = crc32c_zeros(1u << i, n);
  for (int k = 0; k < 4; k++)
    for (int b = 0; b < 256; b++) {
      uint32_t v = 0;
      for (int j = 0; j < 8; j++)
        if (b & (1 << j)) v ^= bit[8 * k + j];
      tab[k][b] = v;
    }
}

static inline uint32_t crc32c_shift(uint32_t tab[4][256], uint32_t s) {
  return tab[0][s & 0xff] ^ tab[1][(s >> 8) & 0xff] ^ tab[2][(s >> 16) & 0xff] ^ tab[3][s >> 24];
}

/* Whole groups of three blocks of `len` bytes at *p, three streams at once; advances *p and *n. */
__attribute__((target("sse4.2"), always_inline)) static inline uint64_t crc32c_blocks(uint64_t c, const uint8_t **pp,
                                                                                     size_t *np, size_t len,
                                                                                     uint32_t tab[4][256]) {
  const uint8_t *p = *pp;
  size_t n = *np;
  while (n >= 3 * len) {
    uint64_t a = c, b = 0, d = 0;
    for (const uint8_t *end = p + len; p < end; p += 8) {
      a = _mm_crc32_u64(a, load64(p));
      b = _mm_crc32_u64(b, load64(p + len));
      d = _mm_crc32_u64(d, load64(p + 2 * len));
    }
    c = crc32c_shift(tab, crc32c_shift(tab, (uint32_t)a) ^ (uint32_t)b) ^ (uint32_t)d;
    p += 2 * len;
    n -= 3 * len;
  }
  *pp = p;
  *np = n;
  return c;
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t n) {
  crc = ~crc;
  while (n > 0 && ((uintptr_t)p & 7) != 0) {
    crc = _mm_crc32_u8(crc, *p++);
    n--;
  }
  uint64_t c = crc;
  c = crc32c_blocks(c, &p, &n, CRC_LONG, crc_long_shift);
  c = crc32c_blocks(c, &p, &n, CRC_SHORT, crc_short_shift);
  while (n >= 8) {
    c = _mm_crc32_u64(c, load64(p));
    p += 8;
    n -= 8;
  }
  crc = (uint32_t)c;
  while (n--) crc = _mm_crc32_u8(crc, *p++);
  return ~crc;
}
static int have_sse42 = 0;
#endif

/* crc32c(buffer[, prev]) -> uint32 */
static napi_value crc32c(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  size_t argc = 2;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1) {
    napi_throw_type_error(env, "EINVAL", "crc32c(buffer[, prev])");
    return NULL;
  }
  void *data = NULL;
  size_t len = 0;
  if (napi_get_buffer_info(env, argv[0], &data, &len) != napi_ok) {
    napi_throw_type_error(env, "EINVAL", "crc32c: the first argument must be a Buffer");
    return NULL;
  }
  uint32_t prev = 0;
  if (argc >= 2 && napi_get_value_uint32(env, argv[1], &prev) != napi_ok) {
    napi_throw_type_error(env, "EINVAL", "crc32c: prev must be a number");
    return NULL;
  }
  uint32_t r;
#if defined(__x86_64__)
  r = have_sse42 ? crc32c_hw(prev, (const uint8_t *)data, len) : crc32c_soft(prev, (const uint8_t *)data, len);
#else
  r = crc32c_soft(prev, (const uint8_t *)data, len);
#endif
  napi_value out;
  napi_create_uint32(env, r, &out);
  return out;
}

static void unmap_finalize(napi_env env, void *data, void *hint) {
  (void)env;
  munmap(data, (size_t)(uintptr_t)hint);
}

/* mapShared(fd, offset, length) -> ArrayBuffer: a read-only MAP_SHARED view of the file. */
static napi_value map_shared(napi_env env, napi_callback_info info) {
  int64_t a[3];
  if (get_args(env, info, 3, a) < 0) return NULL;
  if (a[2] <= 0) {
    napi_throw_range_error(env, "EINVAL", "mapShared: length must be positive");
    return NULL;
  }
  void *p = mmap(NULL, (size_t)a[2], PROT_READ, MAP_SHARED, (int)a[0], (off_t)a[1]);
  if (p == MAP_FAILED) return throw_errno(env, errno, "mmap");
  napi_value out;
  if (napi_create_external_arraybuffer(env, p, (size_t)a[2], unmap_finalize, (void *)(uintptr_t)a[2], &out) != napi_ok) {
    munmap(p, (size_t)a[2]);
    napi_throw_error(env, "EIO", "mapShared: cannot wrap the mapping");
    return NULL;
  }
  return out;
}

struct diff_job {
  const uint8_t *cur;
  uint8_t *ref;
  size_t page, first, last; /* pages [first, last) */
  uint32_t *out;            /* room for last - first indexes */
  size_t count;
};

static void *diff_run(void *arg) {
  struct diff_job *j = arg;
  size_t n = 0;
  for (size_t i = j->first; i < j->last; i++) {
    const uint8_t *c = j->cur + i * j->page;
    uint8_t *r = j->ref + i * j->page;
    if (memcmp(c, r, j->page) != 0) {
      memcpy(r, c, j->page);
      j->out[n++] = (uint32_t)i;
    }
  }
  j->count = n;
  return NULL;
}

/*
 * diffPages(current, reference, pageBytes, out: Uint32Array, threads) -> count
 * Pages of `current` that differ from `reference` are copied into it and their
 * indexes written to `out` in ascending order.
 */
static napi_value diff_pages(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  size_t argc = 5;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 5) {
    napi_throw_type_error(env, "EINVAL", "diffPages(current, reference, pageBytes, out, threads)");
    return NULL;
  }
  void *cur = NULL, *ref = NULL;
  size_t cur_len = 0, ref_len = 0;
  uint32_t page = 0, threads = 0;
  napi_typedarray_type type;
  size_t out_len = 0;
  void *out = NULL;
  if (napi_get_buffer_info(env, argv[0], &cur, &cur_len) != napi_ok ||
      napi_get_buffer_info(env, argv[1], &ref, &ref_len) != napi_ok ||
      napi_get_value_uint32(env, argv[2], &page) != napi_ok ||
      napi_get_typedarray_info(env, argv[3], &type, &out_len, &out, NULL, NULL) != napi_ok ||
      napi_get_value_uint32(env, argv[4], &threads) != napi_ok || type != napi_uint32_array) {
    napi_throw_type_error(env, "EINVAL", "diffPages(Buffer, Buffer, number, Uint32Array, number)");
    return NULL;
  }
  if (page == 0 || cur_len != ref_len || cur_len % page != 0 || out_len < cur_len / page) {
    napi_throw_range_error(env, "EINVAL", "diffPages: equal lengths, a whole number of pages, room for every index");
    return NULL;
  }
  size_t pages = cur_len / page;
  if (threads < 1) threads = 1;
  if (threads > 64) threads = 64;
  if (threads > pages) threads = pages ? (uint32_t)pages : 1;
  struct diff_job jobs[64];
  pthread_t tids[64];
  size_t per = (pages + threads - 1) / threads;
  for (uint32_t t = 0; t < threads; t++) {
    size_t first = t * per, last = first + per > pages ? pages : first + per;
    if (first > pages) first = pages;
    jobs[t] = (struct diff_job){cur, ref, page, first, last, (uint32_t *)out + first, 0};
  }
  uint32_t started = 1;
  for (uint32_t t = 1; t < threads; t++) {
    if (pthread_create(&tids[t], NULL, diff_run, &jobs[t]) != 0) break;
    started++;
  }
  for (uint32_t t = started; t < threads; t++) diff_run(&jobs[t]); /* could not start a thread: do it here */
  diff_run(&jobs[0]);
  for (uint32_t t = 1; t < started; t++) pthread_join(tids[t], NULL);
  /* Compact each thread's indexes behind the previous ones. */
  size_t n = jobs[0].count;
  for (uint32_t t = 1; t < threads; t++) {
    memmove((uint32_t *)out + n, (uint32_t *)out + jobs[t].first, jobs[t].count * sizeof(uint32_t));
    n += jobs[t].count;
  }
  napi_value result;
  napi_create_double(env, (double)n, &result);
  return result;
}

/*
 * sendFileReply(sockFd, header, fileFd, offset, length) -> bytes sent, the
 * header's included. The socket is non-blocking: the call sends what fits and
 * returns (EAGAIN is not an error); the caller queues the rest, in order.
 * The header goes with MSG_MORE, so header and data leave in the same segments.
 */
static napi_value send_file_reply(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 5) {
    napi_throw_type_error(env, "EINVAL", "wrong number of arguments");
    return NULL;
  }
  int64_t sock, fd, off, len;
  void *hdr = NULL;
  size_t hdr_len = 0;
  if (napi_get_value_int64(env, argv[0], &sock) != napi_ok || napi_get_buffer_info(env, argv[1], &hdr, &hdr_len) != napi_ok ||
      napi_get_value_int64(env, argv[2], &fd) != napi_ok || napi_get_value_int64(env, argv[3], &off) != napi_ok ||
      napi_get_value_int64(env, argv[4], &len) != napi_ok || len < 0 || off < 0) {
    napi_throw_type_error(env, "EINVAL", "sendFileReply(sockFd, header, fileFd, offset, length)");
    return NULL;
  }
  int64_t sent = 0;
  int e = 0;
  while ((size_t)sent < hdr_len) {
    ssize_t n = send((int)sock, (char *)hdr + sent, hdr_len - (size_t)sent, MSG_NOSIGNAL | (len > 0 ? MSG_MORE : 0));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) e = errno;
      break;
    }
    sent += n;
  }
  if (!e && (size_t)sent == hdr_len) {
    off_t pos = (off_t)off;
    int64_t left = len;
    while (left > 0) {
      ssize_t n = sendfile((int)sock, (int)fd, &pos, (size_t)(left > 0x40000000 ? 0x40000000 : left));
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) e = errno;
        break;
      }
      if (n == 0) break; /* the file ended before the range did: the caller sends zeroes */
      sent += n;
      left -= n;
    }
  }
  if (e && sent == 0) return throw_errno(env, e, "sendfile");
  /* An error after some bytes went: report those; the next write on the socket meets the error. */
  napi_value result;
  napi_create_int64(env, sent, &result);
  return result;
}

/* tuneMalloc(mmapThreshold, trimThreshold, topPad): true if glibc took all three. */
static napi_value tune_malloc(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  double v[3] = {0, 0, 0};
  for (size_t i = 0; i < 3 && i < argc; i++) napi_get_value_double(env, argv[i], &v[i]);
  bool ok = false;
#if defined(__GLIBC__)
  ok = mallopt(M_MMAP_THRESHOLD, (int)v[0]) == 1;
  ok = mallopt(M_TRIM_THRESHOLD, (int)v[1]) == 1 && ok;
  ok = mallopt(M_TOP_PAD, (int)v[2]) == 1 && ok;
#endif
  napi_value result;
  napi_get_boolean(env, ok, &result);
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  crc32c_init();
#if defined(__x86_64__)
  __builtin_cpu_init();
  have_sse42 = __builtin_cpu_supports("sse4.2");
  if (have_sse42) {
    crc32c_shift_init(crc_long_shift, CRC_LONG);
    crc32c_shift_init(crc_short_shift, CRC_SHORT);
  }
#endif
  napi_property_descriptor props[] = {
      {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_default, NULL},
      {"zeroRange", NULL, zero_range, NULL, NULL, NULL, napi_default, NULL},
      {"allocateRange", NULL, allocate_range, NULL, NULL, NULL, napi_default, NULL},
      {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_default, NULL},
      {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_default, NULL},
      {"copyRange", NULL, copy_range, NULL, NULL, NULL, napi_default, NULL},
      {"copyRangeAsync", NULL, copy_range_async, NULL, NULL, NULL, napi_default, NULL},
      {"copyRangesAsync", NULL, copy_ranges_async, NULL, NULL, NULL, napi_default, NULL},
      {"crc32c", NULL, crc32c, NULL, NULL, NULL, napi_default, NULL},
      {"mapShared", NULL, map_shared, NULL, NULL, NULL, napi_default, NULL},
      {"diffPages", NULL, diff_pages, NULL, NULL, NULL, napi_default, NULL},
      {"tuneMalloc", NULL, tune_malloc, NULL, NULL, NULL, napi_default, NULL},
      {"sendFileReply", NULL, send_file_reply, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, sizeof props / sizeof props[0], props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
