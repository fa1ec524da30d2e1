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


/* -- the record of an open segment (segments.OpenSegment) ----------------- */

/* A C type rather than a slotted Python class: one is built on every open,
 * often in a freshly forked child, where running its Python __init__ (and
 * looking up a slot descriptor per field) copied pages. The fields are
 * plain members, read and written from Python as before; the front end's C
 * (_cview.c) reads `closed` and sets `view` through the offsets it is given
 * by record_offsets(). */
typedef struct {
    PyObject_HEAD
    PyObject *name;
    PyObject *namespace;
    PyObject *handle;
    PyObject *created;
    PyObject *layout;
    PyObject *view;
    PyObject *closed;
    PyObject *forks;
} RecordObject;

static int
Record_init(RecordObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"name", "namespace", "handle", "created", "layout", NULL};
    PyObject *name, *namespace, *handle, *created, *layout;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOO:OpenSegment", kwlist, &name, &namespace,
                                     &handle, &created, &layout)) {
        return -1;
    }
    Py_XSETREF(self->name, Py_NewRef(name));
    Py_XSETREF(self->namespace, Py_NewRef(namespace));
    Py_XSETREF(self->handle, Py_NewRef(handle));
    Py_XSETREF(self->created, Py_NewRef(created));
    Py_XSETREF(self->layout, Py_NewRef(layout));
    Py_XSETREF(self->view, Py_NewRef(Py_None));
    Py_XSETREF(self->closed, Py_NewRef(Py_False));
    Py_XSETREF(self->forks, PyLong_FromLong(0));
    return self->forks == NULL ? -1 : 0;
}

static int
Record_traverse(RecordObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->name);
    Py_VISIT(self->namespace);
    Py_VISIT(self->handle);
    Py_VISIT(self->created);
    Py_VISIT(self->layout);
    Py_VISIT(self->view);
    Py_VISIT(self->closed);
    Py_VISIT(self->forks);
    return 0;
}

static int
Record_clear(RecordObject *self)
{
    Py_CLEAR(self->name);
    Py_CLEAR(self->namespace);
    Py_CLEAR(self->handle);
    Py_CLEAR(self->created);
    Py_CLEAR(self->layout);
    Py_CLEAR(self->view);
    Py_CLEAR(self->closed);
    Py_CLEAR(self->forks);
    return 0;
}

static void
Record_dealloc(RecordObject *self)
{
    PyObject_GC_UnTrack(self);
    Record_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Record_repr(RecordObject *self)
{
    return PyUnicode_FromFormat("<OpenSegment %R in %R (%s)>", self->name ? self->name : Py_None,
                                self->namespace ? self->namespace : Py_None,
                                self->closed == Py_True ? "closed" : "open");
}

static PyMemberDef Record_members[] = {
    {"name", T_OBJECT_EX, offsetof(RecordObject, name), 0, "The name given to ps.shared."},
    {"namespace", T_OBJECT_EX, offsetof(RecordObject, namespace), 0, "Its namespace."},
    {"handle", T_OBJECT_EX, offsetof(RecordObject, handle), 0, "The backend's handle."},
    {"created", T_OBJECT_EX, offsetof(RecordObject, created), 0, "Whether this open created it."},
    {"layout", T_OBJECT_EX, offsetof(RecordObject, layout), 0, "What it holds (a Layout)."},
    {"view", T_OBJECT_EX, offsetof(RecordObject, view), 0,
     "A weak reference to the view to invalidate at close, or None."},
    {"closed", T_OBJECT_EX, offsetof(RecordObject, closed), 0, "Whether it was closed."},
    {"forks", T_OBJECT_EX, offsetof(RecordObject, forks), 0,
     "The engine's fork count when opened."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject RecordType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "procshare._engine.segments.OpenSegment",
    .tp_doc = "One segment this process opened (one ps.shared call).",
    .tp_basicsize = sizeof(RecordObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Record_init,
    .tp_dealloc = (destructor)Record_dealloc,
    .tp_traverse = (traverseproc)Record_traverse,
    .tp_clear = (inquiry)Record_clear,
    .tp_repr = (reprfunc)Record_repr,
    .tp_members = Record_members,
};


/* record_offsets() -> (type, offsets of closed, view, handle and forks): for _cview.c. */
static PyObject *
cengine_record_offsets(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(args))
{
    return Py_BuildValue("(Onnnn)", (PyObject *)&RecordType,
                         (Py_ssize_t)offsetof(RecordObject, closed),
                         (Py_ssize_t)offsetof(RecordObject, view),
                         (Py_ssize_t)offsetof(RecordObject, handle),
                         (Py_ssize_t)offsetof(RecordObject, forks));
}


/* -- a lock's by-name open: the engine's locks part (locks.LocksPart.open) ---
 *
 * The same steps as LocksPart.open and _open_new, which stay the reference:
 * the current namespace, the engine's locks part, its entry for the name
 * (registering the user), else, holding the engine's lock, a new entry: the
 * OS name (remembered per user, as segments.os_name), the metadata
 * (locks._lock_meta), the backend's segment_open, else segment_create with
 * the lock's memory set up, and the entry. Anything unusual (a namespace not
 * swept yet, an OSError, an object too small) is handed to the Python
 * _open_new, which says what went wrong. A lock object is often first opened
 * by name in a freshly forked child: there these steps in Python (eight
 * functions) copied ~25 more pages. What it reads is given once by
 * lock_setup(). */

static PyObject *lk_nsvar, *lk_env, *lk_env_key, *lk_default_ns, *lk_current_namespace,
    *lk_env_namespace, *lk_segments, *lk_locks_part, *lk_entry_cls, *lk_keep_all;
static PyObject *s_parts, *s_locks, *s_entries, *s_users, *s_closed, *s_lock, *s_acquire,
    *s_release, *s_backend, *s_swept, *s_os_names, *s_segment_open, *s_segment_create,
    *s_segment_close, *s_lock_keep, *s_lock_init, *s_lock_attach, *s_lock_data_size,
    *s_data_size, *s_open_new, *s_l, *kw_lopen, *kw_lcreate, *kw_keep;

static int
intern_str(PyObject **slot, const char *text)
{
    if (*slot == NULL) {
        *slot = PyUnicode_InternFromString(text);
    }
    return *slot == NULL ? -1 : 0;
}

static PyObject *
cengine_lock_setup(PyObject *Py_UNUSED(module), PyObject *conf)
{
    static const char *keys[] = {"nsvar", "env", "env_key", "default_namespace",
                                 "current_namespace", "env_namespace", "segments",
                                 "locks_part", "LockEntry", "keep_all"};
    PyObject **slots[] = {&lk_nsvar, &lk_env, &lk_env_key, &lk_default_ns,
                          &lk_current_namespace, &lk_env_namespace, &lk_segments,
                          &lk_locks_part, &lk_entry_cls, &lk_keep_all};
    if (!PyDict_Check(conf)) {
        PyErr_SetString(PyExc_TypeError, "lock_setup(dict)");
        return NULL;
    }
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        PyObject *value = PyDict_GetItemString(conf, keys[i]); /* borrowed */
        if (value == NULL) {
            PyErr_Format(PyExc_KeyError, "lock_setup: %s missing", keys[i]);
            return NULL;
        }
        Py_XSETREF(*slots[i], Py_NewRef(value));
    }
    if (!PyContextVar_CheckExact(lk_nsvar) || (lk_env != Py_None && !PyDict_Check(lk_env)) ||
        !PyDict_Check(lk_segments)) {
        PyErr_SetString(PyExc_TypeError, "lock_setup: wrong types");
        return NULL;
    }
    if (intern_str(&s_parts, "_parts") < 0 || intern_str(&s_locks, "locks") < 0 ||
        intern_str(&s_entries, "_entries") < 0 || intern_str(&s_users, "users") < 0 ||
        intern_str(&s_closed, "closed") < 0 || intern_str(&s_lock, "lock") < 0 ||
        intern_str(&s_acquire, "acquire") < 0 || intern_str(&s_release, "release") < 0 ||
        intern_str(&s_backend, "backend") < 0 || intern_str(&s_swept, "swept_namespaces") < 0 ||
        intern_str(&s_os_names, "_inherited_os_names") < 0 ||
        intern_str(&s_segment_open, "segment_open") < 0 ||
        intern_str(&s_segment_create, "segment_create") < 0 ||
        intern_str(&s_segment_close, "segment_close") < 0 ||
        intern_str(&s_lock_keep, "lock_keep") < 0 || intern_str(&s_lock_init, "lock_init") < 0 ||
        intern_str(&s_lock_attach, "lock_attach") < 0 ||
        intern_str(&s_lock_data_size, "lock_data_size") < 0 ||
        intern_str(&s_data_size, "data_size") < 0 || intern_str(&s_open_new, "_open_new") < 0 ||
        intern_str(&s_l, "l") < 0) {
        return NULL;
    }
    if (kw_lopen == NULL) {
        PyObject *keep_orphan = PyUnicode_InternFromString("keep_orphan");
        PyObject *meta = PyUnicode_InternFromString("meta");
        PyObject *mode = PyUnicode_InternFromString("mode");
        PyObject *persist = PyUnicode_InternFromString("persist");
        PyObject *init = PyUnicode_InternFromString("init");
        PyObject *keep = PyUnicode_InternFromString("keep");
        if (keep_orphan == NULL || meta == NULL || mode == NULL || persist == NULL ||
            init == NULL || keep == NULL) {
            return NULL;
        }
        kw_lopen = PyTuple_Pack(2, keep_orphan, meta);
        kw_lcreate = PyTuple_Pack(5, meta, s_data_size, mode, persist, init);
        kw_keep = PyTuple_Pack(1, keep);
        if (kw_lopen == NULL || kw_lcreate == NULL || kw_keep == NULL) {
            return NULL;
        }
    }
    Py_RETURN_NONE;
}

/* The current namespace (new reference): names.current_namespace(). */
static PyObject *
lock_namespace(PyObject **env)
{
    PyObject *ns;
    if (PyContextVar_Get(lk_nsvar, Py_None, &ns) < 0) {
        return NULL;
    }
    *env = NULL;
    if (lk_env != Py_None) {
        *env = PyDict_GetItemWithError(lk_env, lk_env_key); /* borrowed */
        if (*env == NULL && PyErr_Occurred()) {
            Py_DECREF(ns);
            return NULL;
        }
    }
    if (ns != Py_None) {
        return ns;
    }
    Py_DECREF(ns);
    return *env == NULL ? Py_NewRef(lk_default_ns) : PyObject_CallNoArgs(lk_current_namespace);
}

/* A new entry for (ns, name): the work of LocksPart._open_new, or the Python
 * _open_new itself for anything unusual. New reference, or NULL. */
static PyObject *
lock_open_new(PyObject *part, PyObject *backend, PyObject *ns, PyObject *name, PyObject *mode,
              PyObject *env)
{
    PyObject *swept = PyDict_GetItemWithError(lk_segments, s_swept); /* borrowed */
    if (swept == NULL && PyErr_Occurred()) {
        return NULL;
    }
    int known = swept != NULL && PyAnySet_Check(swept) ? PySet_Contains(swept, ns) : 0;
    if (known < 0) {
        return NULL;
    }
    if (!known) {
        goto python; /* the Python path reclaims the namespace's orphans first */
    }
    /* The OS name, remembered as segments.os_name does. */
    PyObject *uid = PyLong_FromUnsignedLong((unsigned long)geteuid());
    if (uid == NULL) {
        return NULL;
    }
    PyObject *key = PyTuple_Pack(4, s_l, name, ns, uid);
    if (key == NULL) {
        Py_DECREF(uid);
        return NULL;
    }
    PyObject *names_seen = PyDict_GetItemWithError(lk_segments, s_os_names); /* borrowed */
    PyObject *os_name = names_seen != NULL && PyDict_Check(names_seen)
                            ? PyDict_GetItemWithError(names_seen, key)
                            : NULL;
    Py_XINCREF(os_name);
    if (os_name == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(key);
            Py_DECREF(uid);
            return NULL;
        }
        PyObject *args[4] = {s_l, name, ns, uid};
        os_name = cnames_os_name(NULL, args, 4);
        if (os_name != NULL && names_seen != NULL && PyDict_Check(names_seen)) {
            if (PyDict_GET_SIZE(names_seen) >= 4096) {
                PyDict_Clear(names_seen);
            }
            if (PyDict_SetItem(names_seen, key, os_name) < 0) {
                Py_CLEAR(os_name);
            }
        }
    }
    Py_DECREF(key);
    Py_DECREF(uid);
    if (os_name == NULL) {
        return NULL;
    }
    /* The metadata (locks._lock_meta): the creator's $PROCSHARE_NAMESPACE as
     * its origin when it differs from the namespace. */
    PyObject *origin = env == NULL ? Py_NewRef(lk_default_ns) : PyObject_CallNoArgs(lk_env_namespace);
    if (origin == NULL) {
        Py_DECREF(os_name);
        return NULL;
    }
    int same = PyUnicode_Compare(origin, ns) == 0;
    if (PyErr_Occurred()) {
        Py_DECREF(origin);
        Py_DECREF(os_name);
        return NULL;
    }
    PyObject *text = same ? PyUnicode_FromFormat(
                                "{\"kind\": \"lock\", \"name\": \"%U\", \"namespace\": \"%U\"}",
                                name, ns)
                          : PyUnicode_FromFormat("{\"kind\": \"lock\", \"name\": \"%U\", "
                                                 "\"namespace\": \"%U\", \"origin\": \"%U\"}",
                                                 name, ns, origin);
    Py_DECREF(origin);
    PyObject *meta = text == NULL ? NULL : PyUnicode_AsUTF8String(text);
    Py_XDECREF(text);
    if (meta == NULL) {
        Py_DECREF(os_name);
        return NULL;
    }
    /* Open, else create; a racing creator or closer can make both miss once. */
    PyObject *handle = NULL, *keep = NULL, *init = NULL, *size = NULL;
    keep = PyObject_GetAttr(backend, s_lock_keep);
    init = keep == NULL ? NULL : PyObject_GetAttr(backend, s_lock_init);
    size = init == NULL ? NULL : PyObject_GetAttr(backend, s_lock_data_size);
    while (size != NULL) {
        PyObject *open_args[4] = {backend, os_name, keep, meta};
        handle = PyObject_VectorcallMethod(s_segment_open, open_args,
                                           2 | PY_VECTORCALL_ARGUMENTS_OFFSET, kw_lopen);
        if (handle == Py_None) {
            Py_DECREF(handle);
            PyObject *create_args[7] = {backend, os_name, meta, size, mode, Py_False, init};
            handle = PyObject_VectorcallMethod(s_segment_create, create_args,
                                               2 | PY_VECTORCALL_ARGUMENTS_OFFSET, kw_lcreate);
        }
        if (handle == NULL || handle != Py_None) {
            break;
        }
        Py_DECREF(handle);
        handle = NULL;
    }
    Py_XDECREF(keep);
    Py_XDECREF(init);
    Py_DECREF(meta);
    PyObject *entry = NULL;
    if (handle == NULL) {
        Py_XDECREF(size);
        Py_DECREF(os_name);
        if (PyErr_ExceptionMatches(PyExc_OSError)) {
            PyErr_Clear(); /* the Python path tries again and says what went wrong */
            goto python;
        }
        return NULL;
    }
    PyObject *have = PyObject_GetAttr(handle, s_data_size);
    int small = have == NULL ? -1 : PyObject_RichCompareBool(have, size, Py_LT);
    Py_XDECREF(have);
    Py_DECREF(size);
    if (small != 0) {
        if (small > 0) {
            /* Not ours to judge: close it, keeping it, and let the Python
             * path meet it again and say what it is. */
            PyObject *close_args[3] = {backend, handle, lk_keep_all};
            PyObject *done = PyObject_VectorcallMethod(
                s_segment_close, close_args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, kw_keep);
            Py_XDECREF(done);
            if (done != NULL) {
                Py_DECREF(handle);
                Py_DECREF(os_name);
                goto python;
            }
        }
        Py_DECREF(handle);
        Py_DECREF(os_name);
        return NULL;
    }
    PyObject *mutex = PyObject_CallMethodOneArg(backend, s_lock_attach, handle);
    if (mutex != NULL) {
        entry = PyObject_CallFunctionObjArgs(lk_entry_cls, name, ns, os_name, handle, mutex, part,
                                             NULL);
        Py_DECREF(mutex);
    }
    Py_DECREF(handle);
    Py_DECREF(os_name);
    return entry;
python:
    return PyObject_CallMethodObjArgs(part, s_open_new, ns, name, mode, NULL);
}

/* Whether entry.closed is true: 1, 0, -1 with an exception set. */
static int
entry_closed(PyObject *entry)
{
    PyObject *closed = PyObject_GetAttr(entry, s_closed);
    if (closed == NULL) {
        return -1;
    }
    int truth = PyObject_IsTrue(closed);
    Py_DECREF(closed);
    return truth;
}

/* open_lock(engine, name, user, mode) -> the entry for name in the current
 * namespace, user registered on it (LocksPart.open). */
static PyObject *
cengine_open_lock(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || lk_nsvar == NULL) {
        PyErr_SetString(PyExc_TypeError, "open_lock(engine, name, user, mode) after lock_setup()");
        return NULL;
    }
    PyObject *engine = args[0], *name = args[1], *user = args[2], *mode = args[3];
    PyObject *env, *ns = lock_namespace(&env), *part = NULL, *entries = NULL, *key = NULL;
    PyObject *entry = NULL, *users = NULL, *lock = NULL, *result = NULL;
    if (ns == NULL) {
        return NULL;
    }
    PyObject *parts = PyObject_GetAttr(engine, s_parts);
    if (parts == NULL) {
        goto done;
    }
    part = PyDict_Check(parts) ? PyDict_GetItemWithError(parts, s_locks) : NULL;
    Py_XINCREF(part);
    Py_DECREF(parts);
    if (part == NULL) {
        if (PyErr_Occurred()) {
            goto done;
        }
        part = PyObject_CallOneArg(lk_locks_part, engine);
        if (part == NULL) {
            goto done;
        }
    }
    entries = PyObject_GetAttr(part, s_entries);
    key = entries == NULL ? NULL : PyTuple_Pack(2, ns, name);
    if (key == NULL) {
        goto done;
    }
    entry = PyObject_GetItem(entries, key);
    if (entry == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
            goto done;
        }
        PyErr_Clear();
    }
    else {
        /* Register first, then check: a concurrent close marks the entry
         * closed before it looks at the users (LocksPart._close_if_idle). */
        users = PyObject_GetAttr(entry, s_users);
        if (users == NULL || PySet_Add(users, user) < 0) {
            goto done;
        }
        int closed = entry_closed(entry);
        if (closed < 0) {
            goto done;
        }
        if (!closed) {
            result = Py_NewRef(entry);
            goto done;
        }
        if (PySet_Discard(users, user) < 0) {
            goto done;
        }
        Py_CLEAR(users);
        Py_CLEAR(entry);
    }
    lock = PyObject_GetAttr(engine, s_lock);
    PyObject *taken = lock == NULL ? NULL : PyObject_CallMethodNoArgs(lock, s_acquire);
    if (taken == NULL) {
        goto done;
    }
    Py_DECREF(taken);
    entry = PyObject_GetItem(entries, key);
    int fresh = entry == NULL;
    if (entry == NULL) {
        if (PyErr_ExceptionMatches(PyExc_KeyError)) {
            PyErr_Clear();
        }
    }
    else {
        int closed = entry_closed(entry);
        fresh = closed != 0;
        if (closed < 0) {
            Py_CLEAR(entry);
        }
        else if (closed) {
            Py_CLEAR(entry);
        }
    }
    if (!PyErr_Occurred() && fresh) {
        PyObject *backend = PyObject_GetAttr(part, s_backend);
        entry = backend == NULL ? NULL : lock_open_new(part, backend, ns, name, mode, env);
        Py_XDECREF(backend);
        if (entry != NULL && PyObject_SetItem(entries, key, entry) < 0) {
            Py_CLEAR(entry);
        }
    }
    if (entry != NULL) {
        users = PyObject_GetAttr(entry, s_users);
        if (users != NULL && PySet_Add(users, user) == 0) {
            result = Py_NewRef(entry);
        }
    }
    {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyObject *released = PyObject_CallMethodNoArgs(lock, s_release);
        if (released == NULL) {
            if (type == NULL) {
                Py_CLEAR(result); /* that error is the one to report */
                goto done;
            }
            PyErr_Clear();
        }
        Py_XDECREF(released);
        PyErr_Restore(type, value, tb);
    }
done:
    Py_XDECREF(ns);
    Py_XDECREF(part);
    Py_XDECREF(entries);
    Py_XDECREF(key);
    Py_XDECREF(entry);
    Py_XDECREF(users);
    Py_XDECREF(lock);
    return result;
}

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
