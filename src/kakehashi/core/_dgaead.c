/*
 * kakehashi.core._dgaead: the batch forms of DatagramChannel.seal_batch and
 * DatagramChannel.open_batch (src/kakehashi/core/crypto.py) in C, on OpenSSL's EVP
 * AES-256-GCM.
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

#include <limits.h>
#include <stdint.h>
#include <string.h>

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
        unsigned char iv[12];
        Py_ssize_t i;
        for (i = 0; i < n; i++) {
            int k = (int)b.lengths[i], m = 0, f = 0;
            PyObject *size;
            pack_nonce(iv, (uint64_t)seq + (uint64_t)i);
            memcpy(dst, iv + 4, 8);  /* the head: seq as sent */
            /* per datagram only the IV: the key schedule stays from new_ctx */
            if (EVP_EncryptInit_ex(self->ctx, NULL, NULL, NULL, iv) != 1
                    || (k > 0 && EVP_EncryptUpdate(self->ctx, dst + 8, &m,
                                                   base + b.starts[i], k) != 1)
                    || EVP_EncryptFinal_ex(self->ctx, dst + 8 + m, &f) != 1
                    || m + f != k
                    || EVP_CIPHER_CTX_ctrl(self->ctx, EVP_CTRL_GCM_GET_TAG, TAG,
                                           dst + 8 + k) != 1) {
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

/* Opener.open(top, seen, src, starts, lengths, n, out, at)
 *     -> (sizes, top, seen, refused)
 *
 * Datagram i is src[starts[i]:starts[i] + lengths[i]] as sealed; the accepted plaintexts
 * go back to back into out from `at`; sizes[i] is the plaintext's length, -1 for a
 * refusal (shorter than the overhead, outside or already in the window, or not
 * authentic). `top`/`seen` are the channel's window before the batch and after it.
 * Order of the checks per datagram, as in crypto.DatagramChannel.open_batch: the size,
 * the window (on the sequence as carried), then authentication; the window moves only
 * for an authentic datagram, so a repeat later in the same batch is refused. */
static PyObject *
opener_open(Cipher *self, PyObject *args)
{
    PyObject *top_o, *seen_o, *src_o, *starts_o, *lengths_o, *out_o, *result = NULL;
    Py_ssize_t n, at, refused = 0;
    Batch b;
    top_t top;
    uint64_t seen[WORDS];
    if (!PyArg_ParseTuple(args, "OOOOOnOn", &top_o, &seen_o, &src_o, &starts_o, &lengths_o,
                          &n, &out_o, &at))
        return NULL;
    {   /* top: -1 (nothing accepted yet) or 0 .. 2**64 - 1 */
        long long t = PyLong_AsLongLong(top_o);
        if (t == -1 && PyErr_Occurred()) {
            unsigned long long u;
            PyErr_Clear();
            u = PyLong_AsUnsignedLongLong(top_o);
            if (u == (unsigned long long)-1 && PyErr_Occurred())
                return NULL;
            top = (top_t)u;
        } else if (t < -1) {
            PyErr_SetString(PyExc_ValueError, "top below -1");
            return NULL;
        } else {
            top = (top_t)t;
        }
    }
    if (seen_from_py(seen_o, seen) < 0)
        return NULL;
    if (batch_begin(&b, src_o, starts_o, lengths_o, n, out_o, at, 0) < 0)
        goto done;
    {
        unsigned char *dst = (unsigned char *)b.out.buf + at;
        const unsigned char *base = (const unsigned char *)b.src.buf;
        unsigned char iv[12], tag[TAG];
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t got = -1;
            PyObject *size;
            if (b.lengths[i] >= OVERHEAD) {
                const unsigned char *d = base + b.starts[i];
                int k = (int)(b.lengths[i] - OVERHEAD), m = 0, f = 0;
                uint64_t seq = read_seq(d);
                int fresh = (top_t)seq > top;
                unsigned __int128 age = fresh ? 0 : (unsigned __int128)(top - (top_t)seq);
                int admissible = fresh || (age < WINDOW
                                           && !((seen[(unsigned)age / 64]
                                                 >> ((unsigned)age % 64)) & 1));
                if (admissible) {
                    pack_nonce(iv, seq);
                    memcpy(tag, d + 8 + k, TAG);
                    /* a failing Update (never expected after the checks above) is a
                     * refusal like a failing tag: the datagram is not accepted */
                    if (EVP_DecryptInit_ex(self->ctx, NULL, NULL, NULL, iv) == 1
                            && EVP_CIPHER_CTX_ctrl(self->ctx, EVP_CTRL_GCM_SET_TAG, TAG,
                                                   tag) == 1
                            && (k == 0 || EVP_DecryptUpdate(self->ctx, dst, &m, d + 8,
                                                            k) == 1)
                            && EVP_DecryptFinal_ex(self->ctx, dst + m, &f) == 1
                            && m + f == k) {
                        if (fresh) {
                            window_shift_in(seen, (unsigned __int128)((top_t)seq - top));
                            top = (top_t)seq;
                        } else {
                            seen[(unsigned)age / 64] |= (uint64_t)1 << ((unsigned)age % 64);
                        }
                        got = k;
                        dst += k;
                    }
                }
            }
            if (got < 0)
                refused++;
            size = PyLong_FromSsize_t(got);
            if (size == NULL)  /* (the window's moves so far are lost with the batch) */
                goto done;
            PyList_SET_ITEM(b.sizes, i, size);
        }
    }
    result = PyTuple_New(4);
    if (result != NULL) {
        PyObject *top_py = top < 0 ? PyLong_FromLong(-1)
                                   : PyLong_FromUnsignedLongLong((unsigned long long)top);
        PyObject *seen_py = seen_to_py(seen), *refused_py = PyLong_FromSsize_t(refused);
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

/* ------------------------------------------------------------------------------------ */
/* module                                                                                */

static PyMethodDef sealer_methods[] = {
    {"seal", (PyCFunction)sealer_seal, METH_VARARGS,
     "seal(seq, src, starts, lengths, n, out, at) -> sealed lengths"},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef opener_methods[] = {
    {"open", (PyCFunction)opener_open, METH_VARARGS,
     "open(top, seen, src, starts, lengths, n, out, at) -> (sizes, top, seen, refused)"},
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
