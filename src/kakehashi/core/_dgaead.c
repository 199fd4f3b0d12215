/*
 * kakehashi.core._dgaead: the batch forms of DatagramChannel.seal_batch and
 * DatagramChannel.open_batch (src/kakehashi/core/crypto.py) in C, on OpenSSL's EVP
 * AES-256-GCM.
 *
 * Sealer.turn / Opener.turn go one step further: a relay lane's whole readiness
 * callback (receive, seal or open, send) for a session whose port record has decided;
 * see "the lane turn" below.
 *
 * Why this exists: at a sealing end of the proxy chain a datagram cost ~8.8 us of CPU,
 * of which the interpreter's loop and objects around each AEAD call were ~40% and
 * `cryptography` ~19% -- and of that only ~3.5 points were the AES rounds, the rest the
 * cipher context `cryptography` builds and tears down on every call (docs/benchmarks.md).
 * Here each direction keeps ONE EVP_CIPHER_CTX, keyed once; a datagram costs setting
 * its IV, one Update, one Final and the tag, inside one loop in C for the whole batch.
 *
 * The Python code in crypto.py is the reference: the wire format (seq(8, big-endian) ||
 * ciphertext || tag(16)), the nonce (four zero bytes, then seq as sent), and the replay
 * window (the highest sequence accepted, `top`, and a bitmap `seen` of the 1024 before
 * it, moved only after a datagram authenticated, in batch order) are the same, and the
 * tests hold both paths to identical results.
 *
 * The datagrams come from the network: every start/length is checked against the
 * buffers before any byte is read or written (ValueError otherwise, with nothing
 * changed), and a datagram shorter than the overhead is refused, never read.
 * The GIL is held throughout: a context must not be used by two threads at once, and a
 * batch (<= a few hundred microseconds) is shorter than the interpreter's switch
 * interval.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>

#ifdef __linux__
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/uio.h>
#endif

#include <openssl/evp.h>

#define OVERHEAD 24      /* seq (8) + tag (16) */
#define TAG 16
#define WINDOW 1024      /* crypto._WINDOW */
#define WORDS (WINDOW / 64)
#define STACK_N 256      /* datagrams whose layout fits on the stack */
/* a datagram is at most 64 KiB; anything near INT_MAX is refused (EVP takes int) */
#define MAX_LEN (INT_MAX - 64)

/* ------------------------------------------------------------------------------------ */
/* helpers                                                                               */

/* The nonce of sequence `seq`: four zero bytes, then seq big-endian (crypto._pack_nonce). */
static void
pack_nonce(unsigned char iv[12], uint64_t seq)
{
    memset(iv, 0, 4);
    for (int i = 0; i < 8; i++)
        iv[4 + i] = (unsigned char)(seq >> (56 - 8 * i));
}

static uint64_t
read_seq(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

/* Item i of a list, a tuple, or any sequence (a range: what udpbatch passes for fixed
 * slots) as a Py_ssize_t; -1 with an exception set on failure (the caller checks
 * PyErr_Occurred, -1 being a value too). A list's size is checked on every read, not
 * only once before the loop: the other argument may be a sequence of the caller's
 * whose __getitem__ runs Python code, and that code may shrink this list. */
static Py_ssize_t
item_at(PyObject *seq, Py_ssize_t i)
{
    PyObject *o;
    Py_ssize_t v;
    if (PyList_CheckExact(seq)) {
        if (i >= PyList_GET_SIZE(seq)) {
            PyErr_SetString(PyExc_ValueError, "starts or lengths changed during the call");
            return -1;
        }
        return PyLong_AsSsize_t(PyList_GET_ITEM(seq, i));
    }
    if (PyTuple_CheckExact(seq))
        return PyLong_AsSsize_t(PyTuple_GET_ITEM(seq, i));
    o = PySequence_GetItem(seq, i);
    if (o == NULL)
        return -1;
    v = PyLong_AsSsize_t(o);
    Py_DECREF(o);
    return v;
}

/* What both calls take apart from their own arguments: the buffers, the layout of the
 * batch as C arrays (on the stack for the usual burst, else the heap), checked, and the
 * list of sizes to return. */
typedef struct {
    Py_buffer src, out;
    int have_src, have_out;
    Py_ssize_t n, at;
    Py_ssize_t stack[2 * STACK_N];
    Py_ssize_t *heap;
    Py_ssize_t *starts, *lengths;
    PyObject *sizes;
} Batch;

/* Fill `b` for datagrams src[starts[i]:starts[i] + lengths[i]], i < n, with outputs from
 * out[at:]: every datagram inside src, and every output inside out -- sealing adds
 * OVERHEAD to each datagram, opening takes it off (room for all, as if every one were
 * accepted) -- before a byte is read or written. 0, or -1 with an exception (ValueError
 * for a layout that does not fit); batch_end in both cases. */
static int
batch_begin(Batch *b, PyObject *src_o, PyObject *starts_o, PyObject *lengths_o,
            Py_ssize_t n, PyObject *out_o, Py_ssize_t at, int sealing)
{
    Py_ssize_t ns, nl, need = 0;
    b->have_src = b->have_out = 0;
    b->heap = NULL;
    b->sizes = NULL;
    b->n = n;
    b->at = at;
    if (PyObject_GetBuffer(src_o, &b->src, PyBUF_SIMPLE) < 0)
        return -1;
    b->have_src = 1;
    if (PyObject_GetBuffer(out_o, &b->out, PyBUF_WRITABLE) < 0)
        return -1;
    b->have_out = 1;
    if (n < 0 || at < 0 || at > b->out.len) {
        PyErr_Format(PyExc_ValueError, "bad n (%zd) or output offset (%zd)", n, at);
        return -1;
    }
    ns = PySequence_Size(starts_o);
    nl = PySequence_Size(lengths_o);
    if (ns < 0 || nl < 0)
        return -1;
    if (n > ns || n > nl) {
        PyErr_Format(PyExc_ValueError, "n=%zd but %zd starts and %zd lengths", n, ns, nl);
        return -1;
    }
    if (n <= STACK_N) {
        b->starts = b->stack;
        b->lengths = b->stack + STACK_N;
    } else {
        b->heap = PyMem_Calloc(2 * (size_t)n, sizeof(Py_ssize_t));  /* (checks overflow) */
        if (b->heap == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        b->starts = b->heap;
        b->lengths = b->heap + n;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t s = item_at(starts_o, i), k = item_at(lengths_o, i);
        if ((s == -1 || k == -1) && PyErr_Occurred())
            return -1;
        /* written so that nothing can overflow: s <= src.len, then k <= src.len - s */
        if (s < 0 || k < 0 || k > MAX_LEN || s > b->src.len || k > b->src.len - s) {
            PyErr_Format(PyExc_ValueError,
                         "datagram %zd (start %zd, length %zd) is outside the source "
                         "buffer (%zd bytes)", i, s, k, b->src.len);
            return -1;
        }
        b->starts[i] = s;
        b->lengths[i] = k;
        /* (need <= out.len and k <= MAX_LEN: no overflow) */
        need += sealing ? k + OVERHEAD : (k >= OVERHEAD ? k - OVERHEAD : 0);
        if (need > b->out.len - at) {
            PyErr_Format(PyExc_ValueError, "the output buffer is too small (%zd bytes from "
                         "%zd) for the %s batch", b->out.len - at, at,
                         sealing ? "sealed" : "opened");
            return -1;
        }
    }
    b->sizes = PyList_New(n);
    return b->sizes == NULL ? -1 : 0;
}

/* Release what batch_begin took; the sizes list too, unless the caller took it. */
static void
batch_end(Batch *b)
{
    PyMem_Free(b->heap);
    b->heap = NULL;
    Py_CLEAR(b->sizes);
    if (b->have_src)
        PyBuffer_Release(&b->src);
    if (b->have_out)
        PyBuffer_Release(&b->out);
    b->have_src = b->have_out = 0;
}

/* A context for AES-256-GCM in one direction, keyed once (IV set per datagram). */
static EVP_CIPHER_CTX *
new_ctx(const Py_buffer *key, int encrypt)
{
    EVP_CIPHER_CTX *ctx;
    if (key->len != 32) {
        PyErr_SetString(PyExc_ValueError, "AES-256-GCM takes a 32-byte key");
        return NULL;
    }
    ctx = EVP_CIPHER_CTX_new();
    if (ctx == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    /* the default IV length of GCM is 12 bytes: the nonce's */
    if (EVP_CipherInit_ex(ctx, EVP_aes_256_gcm(), NULL, key->buf, NULL, encrypt) != 1) {
        EVP_CIPHER_CTX_free(ctx);
        PyErr_SetString(PyExc_RuntimeError, "EVP AES-256-GCM initialisation failed");
        return NULL;
    }
    return ctx;
}

/* ------------------------------------------------------------------------------------ */
/* the context object: one per direction of a DatagramChannel                            */

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *ctx;
    int encrypt;
} Cipher;

static void
cipher_dealloc(Cipher *self)
{
    if (self->ctx != NULL)
        EVP_CIPHER_CTX_free(self->ctx);  /* cleanses the key schedule */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
cipher_new(PyTypeObject *type, PyObject *args, PyObject *kwds, int encrypt)
{
    static char *kwlist[] = {"key", NULL};
    Py_buffer key;
    Cipher *self;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*", kwlist, &key))
        return NULL;
    self = (Cipher *)type->tp_alloc(type, 0);
    if (self == NULL) {
        PyBuffer_Release(&key);
        return NULL;
    }
    self->encrypt = encrypt;
    self->ctx = new_ctx(&key, encrypt);
    PyBuffer_Release(&key);
    if (self->ctx == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyObject *
sealer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    return cipher_new(type, args, kwds, 1);
}

static PyObject *
opener_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    return cipher_new(type, args, kwds, 0);
}

/* Seal datagram p[0:k] under sequence `seq` into dst (k + OVERHEAD bytes: seq as sent,
 * the ciphertext, the tag); 0, or -1 if EVP failed. Per datagram only the IV is set: the
 * key schedule stays from new_ctx. */
static int
seal_one(EVP_CIPHER_CTX *ctx, uint64_t seq, const unsigned char *p, int k,
         unsigned char *dst)
{
    unsigned char iv[12];
    int m = 0, f = 0;
    pack_nonce(iv, seq);
    memcpy(dst, iv + 4, 8);  /* the head: seq as sent */
    if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv) != 1
            || (k > 0 && EVP_EncryptUpdate(ctx, dst + 8, &m, p, k) != 1)
            || EVP_EncryptFinal_ex(ctx, dst + 8 + m, &f) != 1
            || m + f != k
            || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG, dst + 8 + k) != 1)
        return -1;
    return 0;
}

/* Sealer.seal(seq, src, starts, lengths, n, out, at) -> list of sealed lengths.
 *
 * Datagram i (plaintext src[starts[i]:starts[i] + lengths[i]]) is sealed under sequence
 * seq + i into out, back to back from `at`. The caller (DatagramChannel.seal_batch) has
 * already reserved the sequence numbers and checked them against the counter's end. */
static PyObject *
sealer_seal(Cipher *self, PyObject *args)
{
    PyObject *seq_o, *src_o, *starts_o, *lengths_o, *out_o, *sizes = NULL;
    unsigned long long seq;
    Py_ssize_t n, at;
    Batch b;
    if (!PyArg_ParseTuple(args, "OOOOnOn", &seq_o, &src_o, &starts_o, &lengths_o, &n, &out_o,
                          &at))
        return NULL;
    seq = PyLong_AsUnsignedLongLong(seq_o);  /* (a negative or too large one: an error) */
    if (seq == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (n > 0 && (unsigned long long)(n - 1) > ULLONG_MAX - seq) {
        PyErr_SetString(PyExc_OverflowError, "sequence numbers beyond 2**64");
        return NULL;
    }
    if (batch_begin(&b, src_o, starts_o, lengths_o, n, out_o, at, 1) == 0) {
        unsigned char *dst = (unsigned char *)b.out.buf + at;
        const unsigned char *base = (const unsigned char *)b.src.buf;
        Py_ssize_t i;
        for (i = 0; i < n; i++) {
            int k = (int)b.lengths[i];
            PyObject *size;
            if (seal_one(self->ctx, (uint64_t)seq + (uint64_t)i, base + b.starts[i], k,
                         dst) < 0) {
                PyErr_SetString(PyExc_RuntimeError, "EVP AES-256-GCM sealing failed");
                break;
            }
            dst += k + OVERHEAD;
            size = PyLong_FromSsize_t(k + OVERHEAD);
            if (size == NULL)
                break;
            PyList_SET_ITEM(b.sizes, i, size);
        }
        if (i == n) {  /* all sealed: the list is the caller's */
            sizes = b.sizes;
            b.sizes = NULL;
        }
    }
    batch_end(&b);
    return sizes;
}

/* --- the replay window: crypto._advance over a 1024-bit bitmap ------------------------ */

/* `top` is the highest sequence accepted, -1 for none: it ranges over -1 .. 2**64 - 1, so
 * it is kept as a 128-bit integer and every comparison is exact. Bit i of `seen`
 * (word i / 64, bit i % 64) set: sequence top - i was accepted. */
typedef __int128 top_t;

/* seen = ((seen << shift) | 1) within the window (shift >= 1). */
static void
window_shift_in(uint64_t seen[WORDS], unsigned __int128 shift)
{
    if (shift >= WINDOW) {
        memset(seen, 0, WORDS * sizeof(uint64_t));
    } else {
        unsigned words = (unsigned)(shift / 64), bits = (unsigned)(shift % 64);
        for (int w = WORDS - 1; w >= 0; w--) {
            uint64_t v = 0;
            int from = w - (int)words;
            if (from >= 0) {
                v = seen[from] << bits;
                if (bits && from > 0)
                    v |= seen[from - 1] >> (64 - bits);
            }
            seen[w] = v;
        }
    }
    seen[0] |= 1;
}

/* The bitmap <-> a Python int (0 <= v < 2**1024), as little-endian bytes. Once per
 * batch, so it must cost next to nothing: int.to_bytes / int.from_bytes through
 * PyObject_CallMethod cost ~1.3 us each (a lone datagram's whole AEAD is less), the
 * direct conversions a few tens of ns. They are public from Python 3.13
 * (PyLong_AsNativeBytes); before, the same functions under their private names. */
static int
seen_from_py(PyObject *v, uint64_t seen[WORDS])
{
    unsigned char p[WINDOW / 8];
    if (!PyLong_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "seen: not an int");
        return -1;
    }
#if PY_VERSION_HEX >= 0x030D0000
    {
        Py_ssize_t need;
        if (_PyLong_Sign(v) < 0) {
            PyErr_SetString(PyExc_ValueError, "seen: negative");
            return -1;
        }
        need = PyLong_AsNativeBytes(v, p, (Py_ssize_t)sizeof(p),
                                    Py_ASNATIVEBYTES_LITTLE_ENDIAN
                                    | Py_ASNATIVEBYTES_UNSIGNED_BUFFER);
        if (need < 0)
            return -1;
        if (need > (Py_ssize_t)sizeof(p)) {
            PyErr_SetString(PyExc_ValueError, "seen: not a 1024-bit window");
            return -1;
        }
    }
#else
    if (_PyLong_AsByteArray((PyLongObject *)v, p, sizeof(p), 1, 0) < 0)
        return -1;  /* (OverflowError: negative, or wider than the window) */
#endif
    for (int w = 0; w < WORDS; w++) {
        uint64_t x = 0;
        for (int j = 7; j >= 0; j--)
            x = (x << 8) | p[w * 8 + j];
        seen[w] = x;
    }
    return 0;
}

static PyObject *
seen_to_py(const uint64_t seen[WORDS])
{
    unsigned char p[WINDOW / 8];
    for (int w = 0; w < WORDS; w++)
        for (int j = 0; j < 8; j++)
            p[w * 8 + j] = (unsigned char)(seen[w] >> (8 * j));
#if PY_VERSION_HEX >= 0x030D0000
    return PyLong_FromUnsignedNativeBytes(p, sizeof(p), Py_ASNATIVEBYTES_LITTLE_ENDIAN);
#else
    return _PyLong_FromByteArray(p, sizeof(p), 1, 0);
#endif
}

/* The receiving window: the highest sequence accepted and the bitmap before it. */
typedef struct {
    top_t top;
    uint64_t seen[WORDS];
} Window;

/* top: -1 (nothing accepted yet) or 0 .. 2**64 - 1; 0, or -1 with an exception */
static int
top_from_py(PyObject *o, top_t *top)
{
    long long t = PyLong_AsLongLong(o);
    if (t == -1 && PyErr_Occurred()) {
        unsigned long long u;
        PyErr_Clear();
        u = PyLong_AsUnsignedLongLong(o);
        if (u == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
        *top = (top_t)u;
    } else if (t < -1) {
        PyErr_SetString(PyExc_ValueError, "top below -1");
        return -1;
    } else {
        *top = (top_t)t;
    }
    return 0;
}

static PyObject *
top_to_py(top_t top)
{
    return top < 0 ? PyLong_FromLong(-1) : PyLong_FromUnsignedLongLong((unsigned long long)top);
}

/* Open datagram d[0:len] as sealed into dst; the plaintext's length, or -1 for a refusal
 * (shorter than the overhead, outside or already in the window, or not authentic).
 * Order of the checks, as in crypto.DatagramChannel.open_batch: the size, the window (on
 * the sequence as carried), then authentication; the window moves only for an authentic
 * datagram, so a repeat later in the same batch is refused. */
static Py_ssize_t
open_one(EVP_CIPHER_CTX *ctx, Window *w, const unsigned char *d, Py_ssize_t len,
         unsigned char *dst)
{
    unsigned char iv[12], tag[TAG];
    int k, m = 0, f = 0, fresh, admissible;
    uint64_t seq;
    unsigned __int128 age;
    if (len < OVERHEAD)
        return -1;
    k = (int)(len - OVERHEAD);
    seq = read_seq(d);
    fresh = (top_t)seq > w->top;
    age = fresh ? 0 : (unsigned __int128)(w->top - (top_t)seq);
    admissible = fresh || (age < WINDOW && !((w->seen[(unsigned)age / 64]
                                              >> ((unsigned)age % 64)) & 1));
    if (!admissible)
        return -1;
    pack_nonce(iv, seq);
    memcpy(tag, d + 8 + k, TAG);
    /* a failing Update (never expected after the checks above) is a refusal like a
     * failing tag: the datagram is not accepted */
    if (EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, iv) != 1
            || EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG, tag) != 1
            || (k > 0 && EVP_DecryptUpdate(ctx, dst, &m, d + 8, k) != 1)
            || EVP_DecryptFinal_ex(ctx, dst + m, &f) != 1
            || m + f != k)
        return -1;
    if (fresh) {
        window_shift_in(w->seen, (unsigned __int128)((top_t)seq - w->top));
        w->top = (top_t)seq;
    } else {
        w->seen[(unsigned)age / 64] |= (uint64_t)1 << ((unsigned)age % 64);
    }
    return k;
}

/* Opener.open(top, seen, src, starts, lengths, n, out, at)
 *     -> (sizes, top, seen, refused)
 *
 * Datagram i is src[starts[i]:starts[i] + lengths[i]] as sealed; the accepted plaintexts
 * go back to back into out from `at`; sizes[i] is the plaintext's length, -1 for a
 * refusal (open_one). `top`/`seen` are the channel's window before the batch and after
 * it. */
static PyObject *
opener_open(Cipher *self, PyObject *args)
{
    PyObject *top_o, *seen_o, *src_o, *starts_o, *lengths_o, *out_o, *result = NULL;
    Py_ssize_t n, at, refused = 0;
    Batch b;
    Window w;
    if (!PyArg_ParseTuple(args, "OOOOOnOn", &top_o, &seen_o, &src_o, &starts_o, &lengths_o,
                          &n, &out_o, &at))
        return NULL;
    if (top_from_py(top_o, &w.top) < 0 || seen_from_py(seen_o, w.seen) < 0)
        return NULL;
    if (batch_begin(&b, src_o, starts_o, lengths_o, n, out_o, at, 0) < 0)
        goto done;
    {
        unsigned char *dst = (unsigned char *)b.out.buf + at;
        const unsigned char *base = (const unsigned char *)b.src.buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t got = open_one(self->ctx, &w, base + b.starts[i], b.lengths[i], dst);
            PyObject *size;
            if (got < 0)
                refused++;
            else
                dst += got;
            size = PyLong_FromSsize_t(got);
            if (size == NULL)  /* (the window's moves so far are lost with the batch) */
                goto done;
            PyList_SET_ITEM(b.sizes, i, size);
        }
    }
    result = PyTuple_New(4);
    if (result != NULL) {
        PyObject *top_py = top_to_py(w.top);
        PyObject *seen_py = seen_to_py(w.seen), *refused_py = PyLong_FromSsize_t(refused);
        PyTuple_SET_ITEM(result, 0, b.sizes);  /* (each SET_ITEM takes the reference) */
        b.sizes = NULL;
        PyTuple_SET_ITEM(result, 1, top_py);
        PyTuple_SET_ITEM(result, 2, seen_py);
        PyTuple_SET_ITEM(result, 3, refused_py);
        if (top_py == NULL || seen_py == NULL || refused_py == NULL)
            Py_CLEAR(result);
    }
done:
    batch_end(&b);
    return result;
}

#ifdef __linux__  /* (recvmmsg, sendmmsg, UDP_SEGMENT: elsewhere no turn, the Python lane) */
/* ------------------------------------------------------------------------------------ */
/* the lane turn: one readiness callback of a sealing end's lane, receive to send        */
/*
 * Why: at a sealing end of the chain a datagram cost 7-9 us of CPU in the benchmark's
 * bursts, where one lane alone in a hot loop costs ~2 us: most readiness callbacks take a
 * few datagrams, and each paid ~20-30 us of Python around its system calls and its AEAD
 * call (the receive through ctypes and its bookkeeping, the record's decision, the send
 * area, the send), about 40% of the process's CPU in a profile (docs/benchmarks.md).
 *
 * Sealer.turn / Opener.turn do that callback's work for a session whose port record has
 * already decided where the lane's datagrams go: every datagram from `peer` (the source
 * the record accepts) is sealed or opened and sent to `dst` (where the record sends
 * it). It applies that decision and nothing else: the first message from any other
 * source ends the turn, and it and everything received after it is handed back
 * (`rest`: (payload, sockaddr) per datagram, in order) for the Python path to decide;
 * the caller counts what was taken in the record. Same wire format, nonces and replay
 * window as Sealer.seal / Opener.open (seal_one, open_one); the sends are those of
 * kakehashi.core.udpbatch (consecutive outputs of one size as one segmentation-offloaded
 * send, a route that refuses the offload gets them one by one; a full send buffer drops).
 *
 * The buffers are one area for the process (allocated on first use; only touched pages
 * cost memory): the GIL is held for the whole turn, and a turn is done with them when it
 * returns. The sockets are non-blocking; no call here waits.
 */

#define RX_MSGS 64                          /* messages per recvmmsg (udpbatch.BATCH) */
#define SLOT 65536                          /* room for one message (udpbatch.SLOT) */
#define CUT_MAX 128                         /* datagrams one message holds (GRO_SEGMENTS) */
#define PIECES (RX_MSGS * CUT_MAX)          /* datagrams of one receive, after cutting */
#define TX_BYTES ((size_t)RX_MSGS * SLOT + (size_t)PIECES * OVERHEAD)
#define GSO_SEGMENTS 64                     /* udpbatch.GSO_SEGMENTS, _BYTES, _SIZE */
#define GSO_BYTES 65000
#define GSO_SIZE 1472
#define SEND_CHUNK 1024                     /* headers per sendmmsg (UIO_MAXIOV) */
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

typedef union {
    char buf[CMSG_SPACE(sizeof(int))];
    struct cmsghdr align;
} RxCtl;

typedef union {
    char buf[CMSG_SPACE(sizeof(uint16_t))];
    struct cmsghdr align;
} TxCtl;

typedef struct {
    unsigned char *rx, *tx;
    struct mmsghdr rh[RX_MSGS];
    struct iovec riov[RX_MSGS];
    struct sockaddr_storage names[RX_MSGS];
    RxCtl rctl[RX_MSGS];
    /* datagram i of a receive: where it lies in rx, its length; then its output's size
     * (-1: refused), then (compacted) the accepted outputs' sizes */
    Py_ssize_t start[PIECES], len[PIECES], size[PIECES];
    int count[PIECES];                      /* datagrams per send header */
    struct mmsghdr sh[PIECES];
    struct iovec siov[PIECES];
    TxCtl sctl[PIECES];
} Area;

static Area *area;
/* a turn is using the area: another (a finalizer run by an allocation in rest_of, on this
 * thread or, through it, another) gets None and its caller takes the Python path */
static int area_busy;

static Area *
get_area(void)
{
    Area *a;
    if (area != NULL)
        return area;
    a = PyMem_RawCalloc(1, sizeof(Area));
    if (a == NULL)
        return (Area *)PyErr_NoMemory();
    a->rx = PyMem_RawMalloc((size_t)RX_MSGS * SLOT);
    a->tx = PyMem_RawMalloc(TX_BYTES);
    if (a->rx == NULL || a->tx == NULL) {
        PyMem_RawFree(a->rx);
        PyMem_RawFree(a->tx);
        PyMem_RawFree(a);
        return (Area *)PyErr_NoMemory();
    }
    for (int i = 0; i < RX_MSGS; i++) {
        a->riov[i].iov_base = a->rx + (size_t)i * SLOT;
        a->riov[i].iov_len = SLOT;
        a->rh[i].msg_hdr.msg_iov = &a->riov[i];
        a->rh[i].msg_hdr.msg_iovlen = 1;
    }
    area = a;
    return a;
}

typedef struct {
    EVP_CIPHER_CTX *ctx;
    int sealing;
    uint64_t seq, left;       /* sealing: the next sequence; how many may still be used */
    Window w;                 /* opening */
    int fd_out;
    const struct sockaddr *dst;
    socklen_t dstlen;
    int gso;                  /* in: segmentation offload allowed; out: still allowed */
    Py_ssize_t taken, bytes, refused, failed, overflow;
    int rx_error;
} Turn;

static int
again(int err)
{
    return err == EAGAIN || err == EWOULDBLOCK || err == EINTR;
}

/* errors that say "not with segmentation offload" (udpbatch._NO_GSO) */
static int
no_gso(int err)
{
    return err == EINVAL || err == EIO || err == ENOPROTOOPT || err == EOPNOTSUPP
        || err == EMSGSIZE;
}

/* The segment size of a coalesced message (UDP_GRO), 0 for none. */
static Py_ssize_t
gro_segment(struct msghdr *h)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c)) {
        if (c->cmsg_level == SOL_UDP && c->cmsg_type == UDP_GRO
                && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
            int seg;
            memcpy(&seg, CMSG_DATA(c), sizeof(int));
            return seg > 0 ? seg : 0;
        }
    }
    return 0;
}

/* Send the accepted outputs (sizes in a->size[0:m], back to back in tx) to t->dst. */
static void
send_outputs(Turn *t, Area *a, Py_ssize_t m)
{
    Py_ssize_t g = 0, off = 0, h;
    for (Py_ssize_t i = 0; i < m; ) {
        Py_ssize_t s = a->size[i];
        int c = 1;
        struct msghdr *hd = &a->sh[g].msg_hdr;
        if (t->gso && s > 0 && s <= GSO_SIZE)
            while (i + c < m && c < GSO_SEGMENTS && a->size[i + c] == s
                   && (c + 1) * s <= GSO_BYTES)
                c++;
        a->siov[g].iov_base = a->tx + off;
        a->siov[g].iov_len = (size_t)(c * s);
        memset(hd, 0, sizeof(*hd));
        hd->msg_name = (void *)t->dst;
        hd->msg_namelen = t->dstlen;
        hd->msg_iov = &a->siov[g];
        hd->msg_iovlen = 1;
        if (c > 1) {
            struct cmsghdr *cm;
            uint16_t seg = (uint16_t)s;
            hd->msg_control = a->sctl[g].buf;
            hd->msg_controllen = sizeof(a->sctl[g].buf);
            cm = CMSG_FIRSTHDR(hd);
            cm->cmsg_level = SOL_UDP;
            cm->cmsg_type = UDP_SEGMENT;
            cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            memcpy(CMSG_DATA(cm), &seg, sizeof(seg));
        }
        a->count[g] = c;
        off += c * s;
        i += c;
        g++;
    }
    for (h = 0; h < g; ) {
        unsigned int n = (unsigned int)(g - h < SEND_CHUNK ? g - h : SEND_CHUNK);
        int r = sendmmsg(t->fd_out, &a->sh[h], n, MSG_DONTWAIT), err;
        if (r > 0) {
            h += r;
            continue;
        }
        err = r < 0 ? errno : EIO;
        if (again(err)) {  /* the send buffer is full: UDP drops */
            for (; h < g; h++)
                t->overflow += a->count[h];
            break;
        }
        if (a->count[h] > 1 && no_gso(err)) {
            /* this route takes no segmentation offload: these go one by one, and the
             * caller makes no more runs to it */
            const unsigned char *p = a->sh[h].msg_hdr.msg_iov->iov_base;
            size_t s = a->sh[h].msg_hdr.msg_iov->iov_len / (size_t)a->count[h];
            t->gso = 0;
            for (int j = 0; j < a->count[h]; j++, p += s) {
                if (sendto(t->fd_out, p, s, MSG_DONTWAIT, t->dst, t->dstlen) < 0) {
                    if (again(errno))
                        t->overflow++;
                    else
                        t->failed++;
                }
            }
        } else {
            t->failed += a->count[h];  /* an unreachable network, too large */
        }
        h++;
    }
}

/* Seal or open datagrams 0..np-1 of the receive into tx, then send what was accepted. */
static void
transform_send(Turn *t, Area *a, Py_ssize_t np)
{
    unsigned char *o = a->tx;
    Py_ssize_t m = 0;
    for (Py_ssize_t i = 0; i < np; i++) {
        const unsigned char *p = a->rx + a->start[i];
        Py_ssize_t s;
        if (t->sealing) {
            /* (the sequence is used whatever happens: a nonce is never used twice) */
            s = seal_one(t->ctx, t->seq++, p, (int)a->len[i], o) < 0 ? -2
                : a->len[i] + OVERHEAD;
        } else {
            s = open_one(t->ctx, &t->w, p, a->len[i], o);
        }
        if (s == -2)
            t->failed++;  /* EVP failed (never expected): not sent */
        else if (s < 0)
            t->refused++;
        else {
            a->size[m++] = s;
            o += s;
        }
    }
    send_outputs(t, a, m);
}

/* Messages first..r-1 of the last receive as [(payload, sockaddr), ...], each cut into
 * its datagrams; NULL with an exception. */
static PyObject *
rest_of(Area *a, int first, int r)
{
    PyObject *rest = PyList_New(0);
    if (rest == NULL)
        return NULL;
    for (int i = first; i < r; i++) {
        struct msghdr *h = &a->rh[i].msg_hdr;
        Py_ssize_t size = a->rh[i].msg_len, seg = gro_segment(h), at = 0;
        const char *base = (const char *)a->rx + (size_t)i * SLOT;
        socklen_t namelen = h->msg_namelen;
        if (namelen > sizeof(struct sockaddr_storage))
            namelen = sizeof(struct sockaddr_storage);
        if (!(seg > 0 && seg < size))
            seg = size;
        do {
            Py_ssize_t k = size - at < seg ? size - at : seg;
            PyObject *item = Py_BuildValue("(y#y#)", base + at, k, (const char *)h->msg_name,
                                           (Py_ssize_t)namelen);
            if (item == NULL || PyList_Append(rest, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(rest);
                return NULL;
            }
            Py_DECREF(item);
            at += k;
        } while (at < size);
    }
    return rest;
}

/* The turn: receive, take what came from `peer`, seal or open it, send it, again while a
 * receive filled every header and fewer than `bound` messages were taken. Returns the
 * rest (a list) when a message came from another source (or, sealing, the sequence
 * would run out), Py_None otherwise (a new reference either way); NULL with an
 * exception. */
static PyObject *
lane_turn(Turn *t, int fd_in, const char *peer, Py_ssize_t peerlen, Py_ssize_t bound)
{
    Area *a = get_area();
    Py_ssize_t total = 0;
    if (a == NULL)
        return NULL;
    for (;;) {
        int r, i;
        Py_ssize_t np = 0;
        for (i = 0; i < RX_MSGS; i++) {
            struct msghdr *h = &a->rh[i].msg_hdr;
            h->msg_name = &a->names[i];
            h->msg_namelen = sizeof(a->names[i]);
            h->msg_control = a->rctl[i].buf;
            h->msg_controllen = sizeof(a->rctl[i].buf);
            h->msg_flags = 0;
        }
        r = recvmmsg(fd_in, a->rh, RX_MSGS, MSG_DONTWAIT, NULL);
        if (r < 0) {
            if (!again(errno))
                t->rx_error = 1;  /* an error queued on the socket (ICMP): not fatal */
            Py_RETURN_NONE;
        }
        for (i = 0; i < r; i++) {
            struct msghdr *h = &a->rh[i].msg_hdr;
            Py_ssize_t size = a->rh[i].msg_len, seg = gro_segment(h), pieces, at;
            if ((Py_ssize_t)h->msg_namelen != peerlen
                    || memcmp(h->msg_name, peer, (size_t)peerlen) != 0)
                break;  /* another source: the record decides */
            pieces = seg > 0 && seg < size ? (size + seg - 1) / seg : 1;
            if (!(seg > 0 && seg < size))
                seg = size;
            if (pieces > CUT_MAX || (t->sealing && (uint64_t)pieces > t->left))
                break;  /* more than a message holds, or the sequence's end: Python's */
            if (np + pieces > PIECES) {
                transform_send(t, a, np);
                np = 0;
            }
            if (t->sealing)
                t->left -= (uint64_t)pieces;
            at = 0;
            for (Py_ssize_t j = 0; j < pieces; j++, np++, at += seg) {
                a->start[np] = (Py_ssize_t)i * SLOT + at;
                a->len[np] = size - at < seg ? size - at : seg;
            }
            t->taken += pieces;
            t->bytes += size;
        }
        if (np)
            transform_send(t, a, np);
        if (i < r)
            return rest_of(a, i, r);
        total += r;
        if (r < RX_MSGS || total >= bound)
            Py_RETURN_NONE;
    }
}

/* The arguments both turns share; 0, or -1 with an exception. */
static int
turn_args(Turn *t, int fd_out, const char *dst, Py_ssize_t dstlen, Py_ssize_t peerlen,
          int gso, Py_ssize_t bound)
{
    if (peerlen < (Py_ssize_t)sizeof(sa_family_t)
            || peerlen > (Py_ssize_t)sizeof(struct sockaddr_storage)
            || dstlen < (Py_ssize_t)sizeof(sa_family_t)
            || dstlen > (Py_ssize_t)sizeof(struct sockaddr_storage)) {
        PyErr_SetString(PyExc_ValueError, "peer and dst must be sockaddr structures");
        return -1;
    }
    if (bound < 1) {
        PyErr_SetString(PyExc_ValueError, "bound must be at least 1");
        return -1;
    }
    t->fd_out = fd_out;
    t->dst = (const struct sockaddr *)dst;
    t->dstlen = (socklen_t)dstlen;
    t->gso = gso;
    t->taken = t->bytes = t->refused = t->failed = t->overflow = 0;
    t->rx_error = 0;
    return 0;
}

/* Sealer.turn(seq, end, fd_in, fd_out, peer, dst, gso, bound)
 *     -> (seq, taken, bytes, refused, failed, overflow, rx_error, gso, rest)
 *
 * `seq` is the channel's next sequence and `end` the first it may not use; the new next
 * sequence comes back (every one used, sent or not). */
static PyObject *
sealer_turn(Cipher *self, PyObject *args)
{
    PyObject *seq_o, *end_o, *rest;
    const char *peer, *dst;
    Py_ssize_t peerlen, dstlen, bound;
    int fd_in, fd_out, gso;
    unsigned long long end;
    Turn t;
    if (!PyArg_ParseTuple(args, "OOiiy#y#pn", &seq_o, &end_o, &fd_in, &fd_out, &peer,
                          &peerlen, &dst, &dstlen, &gso, &bound))
        return NULL;
    t.seq = PyLong_AsUnsignedLongLong(seq_o);
    if (t.seq == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    end = PyLong_AsUnsignedLongLong(end_o);
    if (end == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (turn_args(&t, fd_out, dst, dstlen, peerlen, gso, bound) < 0)
        return NULL;
    if (area_busy)
        Py_RETURN_NONE;
    t.ctx = self->ctx;
    t.sealing = 1;
    t.left = end > t.seq ? end - t.seq : 0;
    area_busy = 1;
    rest = lane_turn(&t, fd_in, peer, peerlen, bound);
    area_busy = 0;
    if (rest == NULL)  /* (no memory for the rest: what was sealed is sent, and the
                        * sequence numbers it used must not come back) */
        PyErr_Clear(), rest = Py_None, Py_INCREF(rest);
    return Py_BuildValue("KnnnnniiN", (unsigned long long)t.seq, t.taken, t.bytes,
                         t.refused, t.failed, t.overflow, t.rx_error, t.gso, rest);
}

/* Opener.turn(top, seen, fd_in, fd_out, peer, dst, gso, bound)
 *     -> (top, seen, taken, bytes, refused, failed, overflow, rx_error, gso, rest) */
static PyObject *
opener_turn(Cipher *self, PyObject *args)
{
    PyObject *top_o, *seen_o, *rest, *top_py, *seen_py;
    const char *peer, *dst;
    Py_ssize_t peerlen, dstlen, bound;
    int fd_in, fd_out, gso;
    Turn t;
    if (!PyArg_ParseTuple(args, "OOiiy#y#pn", &top_o, &seen_o, &fd_in, &fd_out, &peer,
                          &peerlen, &dst, &dstlen, &gso, &bound))
        return NULL;
    if (top_from_py(top_o, &t.w.top) < 0 || seen_from_py(seen_o, t.w.seen) < 0
            || turn_args(&t, fd_out, dst, dstlen, peerlen, gso, bound) < 0)
        return NULL;
    if (area_busy)
        Py_RETURN_NONE;
    t.ctx = self->ctx;
    t.sealing = 0;
    area_busy = 1;
    rest = lane_turn(&t, fd_in, peer, peerlen, bound);
    area_busy = 0;
    if (rest == NULL)  /* (the window moved for what was opened: it must come back) */
        PyErr_Clear(), rest = Py_None, Py_INCREF(rest);
    top_py = top_to_py(t.w.top);
    seen_py = seen_to_py(t.w.seen);
    if (top_py == NULL || seen_py == NULL) {
        Py_XDECREF(top_py);
        Py_XDECREF(seen_py);
        Py_DECREF(rest);
        return NULL;
    }
    return Py_BuildValue("NNnnnnniiN", top_py, seen_py, t.taken, t.bytes, t.refused,
                         t.failed, t.overflow, t.rx_error, t.gso, rest);
}
#endif  /* __linux__ */

/* ------------------------------------------------------------------------------------ */
/* module                                                                                */

static PyMethodDef sealer_methods[] = {
    {"seal", (PyCFunction)sealer_seal, METH_VARARGS,
     "seal(seq, src, starts, lengths, n, out, at) -> sealed lengths"},
#ifdef __linux__
    {"turn", (PyCFunction)sealer_turn, METH_VARARGS,
     "turn(seq, end, fd_in, fd_out, peer, dst, gso, bound) -> (seq, taken, bytes, "
     "refused, failed, overflow, rx_error, gso, rest)"},
#endif
    {NULL, NULL, 0, NULL},
};

static PyMethodDef opener_methods[] = {
    {"open", (PyCFunction)opener_open, METH_VARARGS,
     "open(top, seen, src, starts, lengths, n, out, at) -> (sizes, top, seen, refused)"},
#ifdef __linux__
    {"turn", (PyCFunction)opener_turn, METH_VARARGS,
     "turn(top, seen, fd_in, fd_out, peer, dst, gso, bound) -> (top, seen, taken, bytes, "
     "refused, failed, overflow, rx_error, gso, rest)"},
#endif
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SealerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kakehashi.core._dgaead.Sealer",
    .tp_basicsize = sizeof(Cipher),
    .tp_dealloc = (destructor)cipher_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Sealer(key): AES-256-GCM sealing of datagram batches, one context.",
    .tp_methods = sealer_methods,
    .tp_new = sealer_new,
};

static PyTypeObject OpenerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kakehashi.core._dgaead.Opener",
    .tp_basicsize = sizeof(Cipher),
    .tp_dealloc = (destructor)cipher_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Opener(key): AES-256-GCM opening of datagram batches with the replay "
              "window, one context.",
    .tp_methods = opener_methods,
    .tp_new = opener_new,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kakehashi.core._dgaead",
    .m_doc = "Batch AES-256-GCM for DatagramChannel (see crypto.py), one EVP context per "
             "direction.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__dgaead(void)
{
    PyObject *m;
    if (PyType_Ready(&SealerType) < 0 || PyType_Ready(&OpenerType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Sealer", (PyObject *)&SealerType) < 0
            || PyModule_AddObjectRef(m, "Opener", (PyObject *)&OpenerType) < 0
            || PyModule_AddIntConstant(m, "OPENSSL_VERSION_NUMBER",
                                       (long)OPENSSL_VERSION_NUMBER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
