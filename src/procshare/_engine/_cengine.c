/* The engine's C: the check of a user's name, the hash that makes its OS
 * name, and the record of an open segment.
 *
 * Why C: a lock or segment is often first opened by name in a freshly forked
 * child, where every Python function run for the first time and every object
 * it touches is a copied page (CPython 3.11 writes a code object's counters
 * and reference count on every call). The Python versions of these two steps
 * (a regular expression, an f-string, hashlib's blake2b and hexdigest, across
 * four functions) measured ~25 copy-on-write faults per child; here they
 * touch no Python object but their arguments and the string they return.
 *
 * The definitions stay in procshare/_engine/names.py (its docstring gives
 * the OS-name layout); tests/test_names.py checks this module against
 * hashlib. BLAKE2b is RFC 7693's, unkeyed, with the digest size as its only
 * parameter: the same digests as hashlib.blake2b(data, digest_size=n).
 * No system call, no OS object.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <structmember.h>

#include <unistd.h>

#include <stdint.h>
#include <string.h>

/* -- BLAKE2b (RFC 7693, section 3 and appendix C) ------------------------- */

typedef struct {
    uint8_t b[128]; /* input buffer */
    uint64_t h[8];  /* chained state */
    uint64_t t[2];  /* total number of bytes */
    size_t c;       /* pointer for b[] */
    size_t outlen;  /* digest size */
} b2b_ctx;

static const uint64_t b2b_iv[8] = {
    0x6A09E667F3BCC908ULL, 0xBB67AE8584CAA73BULL, 0x3C6EF372FE94F82BULL,
    0xA54FF53A5F1D36F1ULL, 0x510E527FADE682D1ULL, 0x9B05688C2B3E6C1FULL,
    0x1F83D9ABFB41BD6BULL, 0x5BE0CD19137E2179ULL,
};

static const uint8_t b2b_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

#define ROTR64(x, y) (((x) >> (y)) ^ ((x) << (64 - (y))))

#define B2B_G(a, b, c, d, x, y)        \
    do {                               \
        v[a] = v[a] + v[b] + x;        \
        v[d] = ROTR64(v[d] ^ v[a], 32); \
        v[c] = v[c] + v[d];            \
        v[b] = ROTR64(v[b] ^ v[c], 24); \
        v[a] = v[a] + v[b] + y;        \
        v[d] = ROTR64(v[d] ^ v[a], 16); \
        v[c] = v[c] + v[d];            \
        v[b] = ROTR64(v[b] ^ v[c], 63); \
    } while (0)

static uint64_t
b2b_get64(const uint8_t *p)
{
    return ((uint64_t)p[0]) ^ ((uint64_t)p[1] << 8) ^ ((uint64_t)p[2] << 16) ^
           ((uint64_t)p[3] << 24) ^ ((uint64_t)p[4] << 32) ^ ((uint64_t)p[5] << 40) ^
           ((uint64_t)p[6] << 48) ^ ((uint64_t)p[7] << 56);
}

static void
b2b_compress(b2b_ctx *ctx, int last)
{
    uint64_t v[16], m[16];
    for (int i = 0; i < 8; i++) {
        v[i] = ctx->h[i];
        v[i + 8] = b2b_iv[i];
    }
    v[12] ^= ctx->t[0];
    v[13] ^= ctx->t[1];
    if (last) {
        v[14] = ~v[14];
    }
    for (int i = 0; i < 16; i++) {
        m[i] = b2b_get64(&ctx->b[8 * i]);
    }
    for (int i = 0; i < 12; i++) {
        const uint8_t *s = b2b_sigma[i];
        B2B_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        B2B_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        B2B_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        B2B_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        B2B_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        B2B_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        B2B_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        B2B_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) {
        ctx->h[i] ^= v[i] ^ v[i + 8];
    }
}

static void
b2b_init(b2b_ctx *ctx, size_t outlen)
{
    for (int i = 0; i < 8; i++) {
        ctx->h[i] = b2b_iv[i];
    }
    ctx->h[0] ^= 0x01010000ULL ^ (uint64_t)outlen; /* no key */
    ctx->t[0] = ctx->t[1] = 0;
    ctx->c = 0;
    ctx->outlen = outlen;
    memset(ctx->b, 0, sizeof ctx->b);
}

static void
b2b_update(b2b_ctx *ctx, const void *in, size_t inlen)
{
    const uint8_t *p = in;
    for (size_t i = 0; i < inlen; i++) {
        if (ctx->c == 128) {
            ctx->t[0] += ctx->c;
            if (ctx->t[0] < ctx->c) {
                ctx->t[1]++;
            }
            b2b_compress(ctx, 0);
            ctx->c = 0;
        }
        ctx->b[ctx->c++] = p[i];
    }
}

static void
b2b_final(b2b_ctx *ctx, uint8_t *out)
{
    ctx->t[0] += ctx->c;
    if (ctx->t[0] < ctx->c) {
        ctx->t[1]++;
    }
    while (ctx->c < 128) {
        ctx->b[ctx->c++] = 0;
    }
    b2b_compress(ctx, 1);
    for (size_t i = 0; i < ctx->outlen; i++) {
        out[i] = (uint8_t)((ctx->h[i >> 3] >> (8 * (i & 7))) & 0xFF);
    }
}

/* -- names ------------------------------------------------------------------ */

#define MAX_NAME 128

static const char hexdigits[] = "0123456789abcdef";

static void
to_hex(const uint8_t *digest, size_t chars, char *out)
{
    for (size_t i = 0; i < chars; i++) {
        uint8_t byte = digest[i / 2];
        out[i] = hexdigits[(i % 2) ? (byte & 0xF) : (byte >> 4)];
    }
}

/* Whether `s` (n bytes) is a valid name: 1-128 of A-Z a-z 0-9 . _ - */
static int
valid_bytes(const char *s, Py_ssize_t n)
{
    if (n < 1 || n > MAX_NAME) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-')) {
            return 0;
        }
    }
    return 1;
}

/* valid(obj) -> whether obj is an exact str that is a valid name (never raises). */
static PyObject *
cnames_valid(PyObject *Py_UNUSED(module), PyObject *obj)
{
    if (!PyUnicode_CheckExact(obj) || !PyUnicode_IS_ASCII(obj)) {
        Py_RETURN_FALSE;
    }
    return PyBool_FromLong(
        valid_bytes((const char *)PyUnicode_DATA(obj), PyUnicode_GET_LENGTH(obj)));
}

/* The UTF-8 of a str argument, or NULL with TypeError. */
static const char *
utf8_of(PyObject *obj, Py_ssize_t *size, const char *what)
{
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a str, not %.100s", what, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    return PyUnicode_AsUTF8AndSize(obj, size);
}

/* The namespace prefix, "/ps" + 7 hex digits of blake2b(f"{uid}\0{namespace}", 8),
 * into out (10 characters); -1 with an exception set on bad arguments. */
static int
prefix_into(PyObject *namespace, PyObject *uid, char *out)
{
    Py_ssize_t ns_len;
    const char *ns = utf8_of(namespace, &ns_len, "namespace");
    if (ns == NULL) {
        return -1;
    }
    if (!PyLong_CheckExact(uid)) {
        PyErr_SetString(PyExc_TypeError, "uid must be an int");
        return -1;
    }
    int overflow;
    long long id = PyLong_AsLongLongAndOverflow(uid, &overflow);
    if (overflow != 0 || (id == -1 && PyErr_Occurred())) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_OverflowError, "uid out of range");
        }
        return -1;
    }
    char digits[32];
    int n = snprintf(digits, sizeof digits, "%lld", id);
    b2b_ctx ctx;
    uint8_t digest[8];
    b2b_init(&ctx, 8);
    b2b_update(&ctx, digits, (size_t)n);
    b2b_update(&ctx, "", 1); /* the NUL between them */
    b2b_update(&ctx, ns, (size_t)ns_len);
    b2b_final(&ctx, digest);
    memcpy(out, "/ps", 3);
    to_hex(digest, 7, out + 3);
    return 0;
}

/* prefix(namespace, uid) -> "/ps" + 7 hex digits (names.namespace_prefix). */
static PyObject *
cnames_prefix(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "prefix(namespace, uid)");
        return NULL;
    }
    char out[10];
    if (prefix_into(args[0], args[1], out) < 0) {
        return NULL;
    }
    return PyUnicode_FromStringAndSize(out, 10);
}

/* os_name(kind, name, namespace, uid) -> the 31-character OS name:
 * prefix(namespace, uid) + kind + 20 hex digits of
 * blake2b(f"{namespace}\0{kind}\0{name}", 10) (names.os_name). */
static PyObject *
cnames_os_name(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "os_name(kind, name, namespace, uid)");
        return NULL;
    }
    Py_ssize_t kind_len, name_len, ns_len;
    const char *kind = utf8_of(args[0], &kind_len, "kind");
    if (kind == NULL) {
        return NULL;
    }
    if (kind_len != 1) {
        PyErr_Format(PyExc_ValueError, "object kind must be one character, got %R", args[0]);
        return NULL;
    }
    const char *name = utf8_of(args[1], &name_len, "name");
    if (name == NULL) {
        return NULL;
    }
    const char *ns = utf8_of(args[2], &ns_len, "namespace");
    if (ns == NULL) {
        return NULL;
    }
    char out[31];
    if (prefix_into(args[2], args[3], out) < 0) {
        return NULL;
    }
    out[10] = kind[0];
    b2b_ctx ctx;
    uint8_t digest[10];
    b2b_init(&ctx, 10);
    b2b_update(&ctx, ns, (size_t)ns_len);
    b2b_update(&ctx, "", 1);
    b2b_update(&ctx, kind, 1);
    b2b_update(&ctx, "", 1);
    b2b_update(&ctx, name, (size_t)name_len);
    b2b_final(&ctx, digest);
    to_hex(digest, 20, out + 11);
    return PyUnicode_FromStringAndSize(out, 31);
}

/* blake2b_hex(data, digest_size) -> hashlib.blake2b(data, digest_size=n).hexdigest():
 * for the tests, which check this module's hash against hashlib's. */
static PyObject *
cnames_blake2b_hex(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer data;
    int size;
    if (!PyArg_ParseTuple(args, "y*i:blake2b_hex", &data, &size)) {
        return NULL;
    }
    if (size < 1 || size > 64) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "digest_size must be 1..64");
        return NULL;
    }
    b2b_ctx ctx;
    uint8_t digest[64];
    char hex[128];
    b2b_init(&ctx, (size_t)size);
    b2b_update(&ctx, data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    b2b_final(&ctx, digest);
    to_hex(digest, (size_t)size * 2, hex);
    return PyUnicode_FromStringAndSize(hex, size * 2);
}

#include "../_slots.h"

/* The fields of the engine's own slotted objects that the C paths below
 * read (_slots.h: no attribute lookup, so no page written for it in a fresh
 * child): the Engine's, found by engine_setup(); the locks part's, a lock
 * entry's and the segments part's, found by lock_setup(). */
static ps_slot sl_e_pid, sl_e_forks, sl_e_forking, sl_e_pending, sl_e_kept, sl_e_parts, sl_e_lock,
    sl_e_backend, sl_e_closed, sl_e_deferred;
static ps_slot sl_lp_entries, sl_lp_backend, sl_lp_engine, sl_lp_fast, sl_sp_open;
/* A lock entry's ten slots: read by the open and the end, set by entry_new. */
enum { EN_CLOSED, EN_CLOSED_AT, EN_FORKS, EN_HANDLE, EN_MUTEX, EN_NAME, EN_NAMESPACE,
       EN_OS_NAME, EN_PART, EN_USERS, EN_COUNT };
static const char *const en_names[EN_COUNT] = {"closed", "closed_at", "forks", "handle", "mutex",
                                               "name", "namespace", "os_name", "part", "users"};
static ps_slot sl_le[EN_COUNT];

#include "_cengine_record.h"
#include "_cengine_lock.h"
#include "_cengine_end.h"
#include "_cengine_get.h"
#include "_cengine_new.h"

static PyMethodDef cnames_methods[] = {
    {"valid", cnames_valid, METH_O,
     "valid(obj) -> whether obj is a str of 1-128 characters of A-Z a-z 0-9 . _ -"},
    {"prefix", (PyCFunction)(void (*)(void))cnames_prefix, METH_FASTCALL,
     "prefix(namespace, uid) -> the OS-name prefix of a namespace (names.namespace_prefix)"},
    {"os_name", (PyCFunction)(void (*)(void))cnames_os_name, METH_FASTCALL,
     "os_name(kind, name, namespace, uid) -> the OS name (names.os_name)"},
    {"blake2b_hex", cnames_blake2b_hex, METH_VARARGS,
     "blake2b_hex(data, digest_size) -> hex digest, as hashlib.blake2b's (for tests)"},
    {"lock_setup", cengine_lock_setup, METH_O,
     "lock_setup(dict): what open_lock() reads (see locks.py)."},
    {"open_lock", (PyCFunction)(void (*)(void))cengine_open_lock, METH_FASTCALL,
     "open_lock(engine, name, user, mode) -> the lock entry (locks.LocksPart.open)."},
    {"new_lock_setup", cengine_new_lock_setup, METH_VARARGS,
     "new_lock_setup(InterprocessLock, LockEntry): what new_lock() builds."},
    {"new_lock", (PyCFunction)(void (*)(void))cengine_new_lock, METH_FASTCALL,
     "new_lock(name, mode) -> InterprocessLock(name) with the default options, or "
     "NotImplemented (nothing done) for a name that is not valid."},
    {"engine_setup", cengine_engine_setup, METH_VARARGS,
     "engine_setup(core globals, Engine, _new_engine, threading.Lock): what get_engine() and "
     "after_fork_child() read."},
    {"after_fork_child", cengine_after_fork_child, METH_NOARGS,
     "after_fork_child(): core's reset in each forked child (its os.register_at_fork hook): _pid, "
     "a new _engine_lock, the parent's engine moved to _inherited."},
    {"get_engine", cengine_get_engine, METH_NOARGS,
     "get_engine() -> this process's engine, created on first use (core.get_engine)."},
    {"end_setup", cengine_end_setup, METH_O,
     "end_setup(core globals): where end_child() finds this process's pid."},
    {"end_child", cengine_end_child, METH_O,
     "end_child(engine) -> True if every hold the engine had is ended in C, False if "
     "nothing was done (the Python shutdown must run; see _cengine_end.h)."},
    {"record_offsets", cengine_record_offsets, METH_NOARGS,
     "record_offsets() -> (OpenSegment, offsets of closed, view, handle, forks), for _cview.c"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef cnames_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "procshare._engine._cengine",
    .m_doc = "The engine's C: names, OS names, the open segment record.",
    .m_size = -1,
    .m_methods = cnames_methods,
};

PyMODINIT_FUNC
PyInit__cengine(void)
{
    if (PyType_Ready(&RecordType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&cnames_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "OpenSegment", (PyObject *)&RecordType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
