/*
 * codec.c - a compact encoding of plain data, for small messages.
 *
 * Most tasks and results are a few ints, floats or strings in a tuple or a
 * list.  pickle.dumps() and pickle.loads() cost about a microsecond each for
 * them (a Pickler or Unpickler object, its memo, a Python-level call); this
 * encoding costs a tenth of that.  It covers exactly these types:
 *
 *     None, bool, int, float, str, bytes, and tuple, list, dict, set,
 *     frozenset of them; date, time, datetime (naive, or in UTC),
 *     timedelta
 *
 * exact types only, and namedtuples, enum members and instances of plain
 * classes (see enc_object): a subclass (an OrderedDict) goes through
 * pickle, as does anything else, so the receiver always gets
 * equal values of the very same types.  Pickle keeps shared references
 * within a message (the same list twice is one list after loads()); the
 * encoder refuses such messages (a container, or a str or bytes of 64 or
 * more, met twice: written out each time, it could grow without bound) and
 * they go through pickle too, as do recursive ones, deeper ones than
 * CODEC_MAX_DEPTH and strings with lone surrogates.  Short strings and bytes
 * repeated within a message are written each time and decoded once
 * (dec_atom_get).
 * Plain data too large for one ring record
 * uses the same encoding, in fragments; the receiver gathers it and
 * dispatches on the first byte as for a single record.
 *
 * Format: the byte CP_CODEC_MAGIC (never the first byte of a protocol 2+
 * pickle, which is PROTO, 0x80), then one value:
 *
 *     'N' None   'T' True   'F' False
 *     'j' int32  'i' int64  'I' u32 n, n bytes: a larger int, two's
 *                                complement, little-endian
 *     'd' float64
 *     's' u32 n, n bytes of UTF-8     'b' u32 n, n bytes
 *     't' u32 n, n values (tuple)     'l' u32 n, n values (list)
 *     'D' u32 n, n key/value pairs (dict, in order)
 *     'S' u32 n, n values (set)       'R' u32 n, n values (frozenset)
 *     'Y' u16 year, u8 month, u8 day (date)
 *     'V' u8 hour, minute, second, flags, u32 microsecond (time)
 *     'W' u16 year, u8 month, day, hour, minute, second, flags,
 *         u32 microsecond (datetime); flags: 1 fold, 2 tzinfo is UTC
 *     'Q' i32 days, seconds, microseconds (timedelta)
 *     'K' value module, value name, then as 'k': an object of a class named
 *         here for the first time (its index: the number of 'K' before it)
 *     'k' u8 class index, u32 n, n values (arguments of cls.__new__ after
 *         cls; of an Enum class, 1: its value, for cls(value)), a value:
 *         None or a dict (its state; None for an Enum member)
 *
 * Integers are in native (little-endian) order: both ends are the same
 * machine.  The decoder checks every length against the message and rejects
 * anything malformed with an exception; it never reads out of bounds.
 *
 * Needs the GIL throughout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include "datetime.h"
#include "cpool.h"

/* C-API that moved between the supported versions (3.10 to 3.13). */
#if PY_VERSION_HEX < 0x030B0000
#define PyFloat_Pack8(x, p, le) _PyFloat_Pack8((x), (unsigned char *)(p), (le))
#endif
#if PY_VERSION_HEX >= 0x030D0000
#define long_as_bytes(v, p, n) _PyLong_AsByteArray((v), (p), (n), 1, 1, 1)
#else
#define long_as_bytes(v, p, n) _PyLong_AsByteArray((v), (p), (n), 1, 1)
#endif

#define CODEC_MAX_DEPTH 32
#define CODEC_SHARED_ATOM 64     /* str/bytes this long met twice: pickle */
#define STACK_BYTES 512
#define CODEC_MAX_CLASSES 32     /* classes of objects in one message */

/* ------------------------------------------------------------ encoding */

/*
 * One walk of the value writes either format: this encoding, or a pickle of
 * protocol 5 without memo (`pickle_plain`, for tests and comparisons).
 * Pickling plain data is mostly memo work (every tuple is memoized); without
 * it the pickle costs a fraction, and since shared containers are refused,
 * the memo has nothing to do.  Messages use this encoding whatever their
 * size: decoding it costs about half of unpickling the same data (making
 * ints from LONG1 opcodes dominates unpickling a map chunk's results).
 */
typedef struct {
    uint8_t *buf;
    size_t len, cap;
    size_t max;             /* give up beyond this many bytes */
    int heap;               /* buf is PyMem memory (else the stack) */
    int pk;                 /* write a pickle instead */
    int too_big;            /* gave up because of `max` */
    /* Containers seen that others may also reference (refcount > 1): an
     * open-addressing set of pointers, to refuse shared references. */
    PyObject **seen;
    size_t nseen, seen_cap;
    PyObject *seen_small[32];
    /* Classes of the objects written so far ('K' gave each its index). */
    PyObject *reducers;     /* ForkingPickler's, by type (NULL: not yet) */
    int nclasses;
    PyTypeObject *classes[CODEC_MAX_CLASSES];
    uint8_t kinds[CODEC_MAX_CLASSES];
    unsigned dt_ok, dt_no;  /* date and time types judged (bit: DT_*) */
} enc;

enum { ENC_OK = 0, ENC_NO = 1, ENC_ERR = -1 };   /* ERR: exception set */

/* Pickle opcodes (Lib/pickle.py). */
enum {
    PK_MARK = '(', PK_STOP = '.', PK_NONE = 'N', PK_NEWTRUE = 0x88,
    PK_NEWFALSE = 0x89, PK_BININT = 'J', PK_BININT1 = 'K', PK_BININT2 = 'M',
    PK_LONG1 = 0x8a, PK_LONG4 = 0x8b, PK_BINFLOAT = 'G',
    PK_SHORT_BINUNICODE = 0x8c, PK_BINUNICODE = 'X', PK_BINUNICODE8 = 0x8d,
    PK_SHORT_BINBYTES = 'C', PK_BINBYTES = 'B', PK_BINBYTES8 = 0x8e,
    PK_EMPTY_TUPLE = ')', PK_TUPLE1 = 0x85, PK_TUPLE = 't', PK_EMPTY_LIST = ']',
    PK_APPENDS = 'e', PK_EMPTY_DICT = '}', PK_SETITEMS = 'u', PK_PROTO = 0x80,
    PK_EMPTY_SET = 0x8f, PK_ADDITEMS = 0x90, PK_FROZENSET = 0x91,
};

static int
enc_reserve(enc *e, size_t n)
{
    if (e->len + n > e->max) {
        e->too_big = 1;
        return ENC_NO;
    }
    if (e->len + n <= e->cap)
        return ENC_OK;
    size_t ncap = e->cap * 2;
    while (ncap < e->len + n)
        ncap *= 2;
    uint8_t *nb = e->heap ? PyMem_Realloc(e->buf, ncap) : PyMem_Malloc(ncap);
    if (nb == NULL) {
        PyErr_NoMemory();
        return ENC_ERR;
    }
    if (!e->heap)
        memcpy(nb, e->buf, e->len);
    e->buf = nb;
    e->cap = ncap;
    e->heap = 1;
    return ENC_OK;
}

static int
enc_put(enc *e, const void *p, size_t n)
{
    int rc = enc_reserve(e, n);
    if (rc == ENC_OK && n) {
        memcpy(e->buf + e->len, p, n);
        e->len += n;
    }
    return rc;
}

static int
enc_op(enc *e, uint8_t op)
{
    return enc_put(e, &op, 1);
}

/* An opcode and a value of `size` bytes (little-endian). */
static int
enc_op_val(enc *e, uint8_t op, const void *v, size_t size)
{
    uint8_t h[9];
    h[0] = op;
    memcpy(h + 1, v, size);
    return enc_put(e, h, 1 + size);
}

/* Codec: a tag and a u32 count or length.  Pickle: the opcode for a length
 * that fits 1, 4 or 8 bytes (op8 0: none). */
static int
enc_len(enc *e, uint8_t tag, uint8_t op1, uint8_t op4, uint8_t op8, size_t n)
{
    if (!e->pk) {
        uint32_t n32 = (uint32_t)n;
        return n > UINT32_MAX ? ENC_NO : enc_op_val(e, tag, &n32, 4);
    }
    if (n < 256) {
        uint8_t n8 = (uint8_t)n;
        return enc_op_val(e, op1, &n8, 1);
    }
    if (n <= UINT32_MAX) {
        uint32_t n32 = (uint32_t)n;
        return enc_op_val(e, op4, &n32, 4);
    }
    uint64_t n64 = n;
    return op8 ? enc_op_val(e, op8, &n64, 8) : ENC_NO;
}

static int
enc_blob(enc *e, int is_str, const void *p, size_t n)
{
    int rc = is_str ? enc_len(e, 's', PK_SHORT_BINUNICODE, PK_BINUNICODE,
                              PK_BINUNICODE8, n)
                    : enc_len(e, 'b', PK_SHORT_BINBYTES, PK_BINBYTES,
                              PK_BINBYTES8, n);
    return rc == ENC_OK ? enc_put(e, p, n) : rc;
}

/* Remember a container (or a long string) that may be referenced from
 * elsewhere too; ENC_NO if it was met before in this message. */
static int
enc_seen(enc *e, PyObject *o)
{
    if (e->nseen * 2 >= e->seen_cap) {
        size_t ncap = e->seen_cap * 2;
        PyObject **ns = PyMem_Calloc(ncap, sizeof *ns);
        if (ns == NULL) {
            PyErr_NoMemory();
            return ENC_ERR;
        }
        for (size_t i = 0; i < e->seen_cap; i++) {
            PyObject *x = e->seen[i];
            if (x == NULL)
                continue;
            size_t h = ((uintptr_t)x >> 4) & (ncap - 1);
            while (ns[h] != NULL)
                h = (h + 1) & (ncap - 1);
            ns[h] = x;
        }
        if (e->seen != e->seen_small)
            PyMem_Free(e->seen);
        e->seen = ns;
        e->seen_cap = ncap;
    }
    size_t h = ((uintptr_t)o >> 4) & (e->seen_cap - 1);
    while (e->seen[h] != NULL) {
        if (e->seen[h] == o)
            return ENC_NO;
        h = (h + 1) & (e->seen_cap - 1);
    }
    e->seen[h] = o;
    e->nseen++;
    return ENC_OK;
}

static int
enc_long(enc *e, PyObject *o)
{
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (!overflow) {
        if (e->pk && v >= 0 && v < 256) {
            uint8_t v8 = (uint8_t)v;
            return enc_op_val(e, PK_BININT1, &v8, 1);
        }
        if (e->pk && v >= 0 && v < 65536) {
            uint16_t v16 = (uint16_t)v;
            return enc_op_val(e, PK_BININT2, &v16, 2);
        }
        if (v >= INT32_MIN && v <= INT32_MAX) {
            int32_t v32 = (int32_t)v;
            return enc_op_val(e, e->pk ? PK_BININT : 'j', &v32, 4);
        }
        if (!e->pk)
            return enc_op_val(e, 'i', &v, 8);
        /* LONG1 with as few bytes as the value and its sign need (the
         * low bytes of the little-endian two's complement). */
        uint64_t u = v < 0 ? ~(uint64_t)v : (uint64_t)v;   /* >= 2**31 */
        uint8_t n = (uint8_t)((64 - __builtin_clzll(u)) / 8 + 1);
        uint8_t h[10] = {PK_LONG1, n};
        memcpy(h + 2, &v, n);
        return enc_put(e, h, 2 + (size_t)n);
    }
    size_t bits = _PyLong_NumBits(o);
    if (bits == (size_t)-1 && PyErr_Occurred())
        return ENC_ERR;
    size_t n = bits / 8 + 1;            /* room for the sign bit */
    int rc = enc_len(e, 'I', PK_LONG1, PK_LONG4, 0, n);
    if (rc != ENC_OK || (rc = enc_reserve(e, n)) != ENC_OK)
        return rc;
    if (long_as_bytes((PyLongObject *)o, e->buf + e->len, n) < 0)
        return ENC_ERR;
    e->len += n;
    return ENC_OK;
}

static int
enc_str(enc *e, PyObject *o)
{
    if (PyUnicode_IS_ASCII(o))
        return enc_blob(e, 1, PyUnicode_DATA(o), (size_t)PyUnicode_GET_LENGTH(o));
    /* A temporary UTF-8 copy (PyUnicode_AsUTF8AndSize would keep one with
     * the user's string).  Lone surrogates cannot be encoded: pickle. */
    PyObject *u = PyUnicode_AsUTF8String(o);
    if (u == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
            return ENC_ERR;
        PyErr_Clear();
        return ENC_NO;
    }
    int rc = enc_blob(e, 1, PyBytes_AS_STRING(u), (size_t)PyBytes_GET_SIZE(u));
    Py_DECREF(u);
    return rc;
}

static int enc_value(enc *e, PyObject *o, int depth);
static int enc_dict(enc *e, PyObject *o, int depth);
static int enc_object(enc *e, PyObject *o, int depth);
static int enc_datetime(enc *e, PyObject *o, PyTypeObject *tp);

/* A tuple or list.  Pickle: EMPTY_TUPLE, items TUPLE1-3, MARK items TUPLE;
 * EMPTY_LIST [MARK items APPENDS]. */
static int
enc_seq(enc *e, PyObject *o, int depth)
{
    int tuple = PyTuple_CheckExact(o);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    PyObject **items = PySequence_Fast_ITEMS(o);
    int rc;
    if (!e->pk) {
        rc = enc_len(e, tuple ? 't' : 'l', 0, 0, 0, (size_t)n);
        if (rc == ENC_OK && e->len + (size_t)n > e->max) {
            e->too_big = 1;     /* each value takes a byte at least */
            rc = ENC_NO;
        }
    } else if (tuple) {
        rc = n == 0 ? enc_op(e, PK_EMPTY_TUPLE) : n > 3 ? enc_op(e, PK_MARK) : ENC_OK;
    } else {
        rc = enc_op(e, PK_EMPTY_LIST);
        if (rc == ENC_OK && n > 0)
            rc = enc_op(e, PK_MARK);
    }
    /* Encoding runs no Python code: the list cannot change under us. */
    for (Py_ssize_t i = 0; rc == ENC_OK && i < n; i++)
        rc = enc_value(e, items[i], depth + 1);
    if (rc == ENC_OK && e->pk && n > 0)
        rc = enc_op(e, !tuple ? PK_APPENDS : n > 3 ? PK_TUPLE
                                           : (uint8_t)(PK_TUPLE1 + n - 1));
    return rc;
}

/* Pickle: EMPTY_DICT [MARK keys and values SETITEMS]. */
static int
enc_dict(enc *e, PyObject *o, int depth)
{
    Py_ssize_t n = PyDict_GET_SIZE(o);
    int rc;
    if (!e->pk) {
        rc = enc_len(e, 'D', 0, 0, 0, (size_t)n);
    } else {
        rc = enc_op(e, PK_EMPTY_DICT);
        if (rc == ENC_OK && n > 0)
            rc = enc_op(e, PK_MARK);
    }
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (rc == ENC_OK && PyDict_Next(o, &pos, &k, &v)) {
        rc = enc_value(e, k, depth + 1);
        if (rc == ENC_OK)
            rc = enc_value(e, v, depth + 1);
    }
    if (rc == ENC_OK && e->pk && n > 0)
        rc = enc_op(e, PK_SETITEMS);
    return rc;
}

/* A set or frozenset, in iteration order (pickle's too); the receiver adds
 * the items in that order.  Pickle: EMPTY_SET [MARK items ADDITEMS];
 * MARK items FROZENSET. */
static int
enc_set(enc *e, PyObject *o, int depth)
{
    int frozen = Py_IS_TYPE(o, &PyFrozenSet_Type);
    Py_ssize_t n = PySet_GET_SIZE(o);
    int rc;
    if (!e->pk) {
        rc = enc_len(e, frozen ? 'R' : 'S', 0, 0, 0, (size_t)n);
        if (rc == ENC_OK && e->len + (size_t)n > e->max) {
            e->too_big = 1;
            rc = ENC_NO;
        }
    } else if (frozen) {
        rc = enc_op(e, PK_MARK);
    } else {
        rc = enc_op(e, PK_EMPTY_SET);
        if (rc == ENC_OK && n > 0)
            rc = enc_op(e, PK_MARK);
    }
    /* The iterator of an exact set runs no Python code. */
    PyObject *it = rc == ENC_OK ? PyObject_GetIter(o) : NULL, *x;
    if (rc == ENC_OK && it == NULL)
        rc = ENC_ERR;
    while (rc == ENC_OK && (x = PyIter_Next(it)) != NULL) {
        rc = enc_value(e, x, depth + 1);
        Py_DECREF(x);
    }
    if (rc == ENC_OK && PyErr_Occurred())
        rc = ENC_ERR;
    Py_XDECREF(it);
    if (rc == ENC_OK && e->pk && (frozen || n > 0))
        rc = enc_op(e, frozen ? PK_FROZENSET : PK_ADDITEMS);
    return rc;
}

static int
enc_value(enc *e, PyObject *o, int depth)
{
    PyTypeObject *tp = Py_TYPE(o);
    int rc;
    if (depth > CODEC_MAX_DEPTH)
        return ENC_NO;
    if (tp == &PyLong_Type)
        return enc_long(e, o);
    if (tp == &PyFloat_Type) {
        double d = PyFloat_AS_DOUBLE(o);
        if (!e->pk)
            return enc_op_val(e, 'd', &d, 8);
        char be[8];             /* pickle's floats are big-endian */
        if (PyFloat_Pack8(d, be, 0) < 0)
            return ENC_ERR;
        return enc_op_val(e, PK_BINFLOAT, be, 8);
    }
    if (o == Py_None)
        return enc_op(e, e->pk ? PK_NONE : 'N');
    if (o == Py_True)
        return enc_op(e, e->pk ? PK_NEWTRUE : 'T');
    if (o == Py_False)
        return enc_op(e, e->pk ? PK_NEWFALSE : 'F');
    if (tp == &PyUnicode_Type || tp == &PyBytes_Type) {
        /* A long string referenced many times would be written out each
         * time (pickle writes it once and refers back): such messages go
         * through pickle.  Short ones cost little either way. */
        Py_ssize_t n = tp == &PyBytes_Type ? PyBytes_GET_SIZE(o)
                                           : PyUnicode_GET_LENGTH(o);
        if (n >= CODEC_SHARED_ATOM && Py_REFCNT(o) > 1 &&
            (rc = enc_seen(e, o)) != ENC_OK)
            return rc;
        if (tp == &PyUnicode_Type)
            return enc_str(e, o);
        return enc_blob(e, 0, PyBytes_AS_STRING(o), (size_t)PyBytes_GET_SIZE(o));
    }
    if (tp == &PyTuple_Type || tp == &PyList_Type || tp == &PyDict_Type) {
        /* Only a container that something else also references can be met
         * twice (a tuple can be: its refcount counts each reference). */
        if (Py_REFCNT(o) > 1 && (rc = enc_seen(e, o)) != ENC_OK)
            return rc;
        return tp == &PyDict_Type ? enc_dict(e, o, depth) : enc_seq(e, o, depth);
    }
    if (tp == &PySet_Type || tp == &PyFrozenSet_Type) {
        if (Py_REFCNT(o) > 1 && (rc = enc_seen(e, o)) != ENC_OK)
            return rc;
        return enc_set(e, o, depth);
    }
    const PyDateTime_CAPI *api = PyDateTimeAPI;
    if (api != NULL && (tp == api->DateTimeType || tp == api->DateType ||
                        tp == api->DeltaType || tp == api->TimeType))
        return enc_datetime(e, o, tp);
    return enc_object(e, o, depth);
}

/* ------------------------------------------------------------ objects */

/*
 * Instances of classes that pickle rebuilds in one of three plain ways:
 *
 *   OBJ_TUPLE  a namedtuple: cls.__new__(cls, *fields), no state;
 *   OBJ_DICT   an instance of a class of plain Python classes (a dataclass,
 *              a record class): cls.__new__(cls) with no arguments, then its
 *              __dict__ (pickle's BUILD);
 *   OBJ_ENUM   an Enum member (IntEnum, Flag...: any class whose metaclass
 *              is EnumType itself and whose __reduce_ex__ is Enum's):
 *              cls(member._value_), no state, which finds the member.  A
 *              member met twice is written twice: it is found again.
 *
 * Pickle spends microseconds on each (__reduce_ex__ and its lookups, a
 * Python-level __getnewargs__, the memo); here the class is looked at once
 * per message and each instance costs about what a tuple or a dict does.
 * The receiver rebuilds it as pickle's NEWOBJ and BUILD do, so whatever
 * the class does there (its own __new__, a __setstate__) happens as with
 * pickle.  Anything else pickle would treat otherwise goes through pickle:
 * a reducer registered with copyreg or ForkingPickler, __reduce__,
 * __reduce_ex__, __getstate__, __getnewargs__ of its own, __slots__, a
 * __getattr__ or __getattribute__, a metaclass, a builtin base, a class
 * not found under its module and name (pickle would refuse it), an
 * instance dict holding special names, an instance met twice.
 */
enum { OBJ_NO = 0, OBJ_TUPLE, OBJ_DICT, OBJ_ENUM };

static struct {
    PyObject *reduce_ex, *reduce, *getstate, *cls;   /* object's own */
    PyObject *object_new;       /* object.__new__ */
    PyObject *empty;            /* () */
    PyObject *nt_getnewargs;    /* the code of namedtuple's __getnewargs__ */
    PyObject *copyreg_table;    /* copyreg.dispatch_table */
    PyObject *enum_meta;        /* enum.EnumType */
    PyObject *enum_reduce_ex;   /* enum.Enum.__reduce_ex__ */
    PyObject *s_reduce_ex, *s_reduce, *s_getstate, *s_getnewargs,
             *s_getnewargs_ex, *s_slots, *s_module, *s_class, *s_setstate,
             *s_new, *s_dict, *s_datetime_mod, *s_value_;
} K;

int
cp_codec_setup(void)
{
    static const struct { PyObject **p; const char *s; } names[] = {
        {&K.s_reduce_ex, "__reduce_ex__"}, {&K.s_reduce, "__reduce__"},
        {&K.s_getstate, "__getstate__"}, {&K.s_getnewargs, "__getnewargs__"},
        {&K.s_getnewargs_ex, "__getnewargs_ex__"}, {&K.s_slots, "__slots__"},
        {&K.s_module, "__module__"}, {&K.s_class, "__class__"},
        {&K.s_setstate, "__setstate__"}, {&K.s_new, "__new__"},
        {&K.s_dict, "__dict__"}, {&K.s_datetime_mod, "_datetime"},
        {&K.s_value_, "_value_"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((*names[i].p = PyUnicode_InternFromString(names[i].s)) == NULL)
            return -1;
    PyTypeObject *ob = &PyBaseObject_Type;
    K.reduce_ex = Py_XNewRef(_PyType_Lookup(ob, K.s_reduce_ex));
    K.reduce = Py_XNewRef(_PyType_Lookup(ob, K.s_reduce));
    K.getstate = Py_XNewRef(_PyType_Lookup(ob, K.s_getstate)); /* 3.11+ */
    K.cls = Py_XNewRef(_PyType_Lookup(ob, K.s_class));
    K.object_new = PyObject_GetAttr((PyObject *)ob, K.s_new);
    K.empty = PyTuple_New(0);
    PyObject *copyreg = PyImport_ImportModule("copyreg");
    K.copyreg_table = copyreg ? PyObject_GetAttrString(copyreg, "dispatch_table") : NULL;
    Py_XDECREF(copyreg);
    /* Every namedtuple's __getnewargs__ is made from one code object, a
     * constant of namedtuple()'s own code. */
    PyObject *coll = PyImport_ImportModule("collections");
    PyObject *f = coll ? PyObject_GetAttrString(coll, "namedtuple") : NULL;
    PyObject *code = f ? PyObject_GetAttrString(f, "__code__") : NULL;
    PyObject *consts = code ? PyObject_GetAttrString(code, "co_consts") : NULL;
    for (Py_ssize_t i = 0; consts != NULL && PyTuple_Check(consts) &&
                           i < PyTuple_GET_SIZE(consts) && K.nt_getnewargs == NULL; i++) {
        PyObject *c = PyTuple_GET_ITEM(consts, i);
        if (PyCode_Check(c) &&
            PyUnicode_CompareWithASCIIString(((PyCodeObject *)c)->co_name,
                                             "__getnewargs__") == 0)
            K.nt_getnewargs = Py_NewRef(c);
    }
    Py_XDECREF(consts);
    Py_XDECREF(code);
    Py_XDECREF(f);
    Py_XDECREF(coll);
    /* Enum members pickle as cls(value) through Enum.__reduce_ex__ (enum
     * is loaded already: multiprocessing imports it). */
    PyObject *enum_mod = PyImport_ImportModule("enum");
    PyObject *enum_cls = enum_mod ? PyObject_GetAttrString(enum_mod, "Enum") : NULL;
    K.enum_meta = enum_mod ? PyObject_GetAttrString(enum_mod, "EnumMeta") : NULL;
    if (enum_cls != NULL && PyType_Check(enum_cls))
        K.enum_reduce_ex = Py_XNewRef(_PyType_Lookup((PyTypeObject *)enum_cls,
                                                     K.s_reduce_ex));
    Py_XDECREF(enum_cls);
    Py_XDECREF(enum_mod);
    if (K.reduce_ex == NULL || K.reduce == NULL || K.cls == NULL ||
        K.object_new == NULL || K.empty == NULL || K.nt_getnewargs == NULL ||
        K.copyreg_table == NULL || !PyDict_Check(K.copyreg_table) ||
        K.enum_meta == NULL || !PyType_Check(K.enum_meta) || K.enum_reduce_ex == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "cpool: codec set-up failed");
        return -1;
    }
    return 0;
}

void
cp_codec_clear(void)
{
    PyObject **all[] = {
        &K.reduce_ex, &K.reduce, &K.getstate, &K.cls, &K.object_new, &K.empty,
        &K.nt_getnewargs, &K.copyreg_table, &K.s_reduce_ex, &K.s_reduce,
        &K.s_getstate, &K.s_getnewargs, &K.s_getnewargs_ex, &K.s_slots,
        &K.s_module, &K.s_class, &K.s_setstate, &K.s_new, &K.s_dict,
        &K.s_datetime_mod, &K.s_value_, &K.enum_meta, &K.enum_reduce_ex,
    };
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        Py_CLEAR(*all[i]);
}

static int
has_dict(PyTypeObject *tp)
{
#ifdef Py_TPFLAGS_MANAGED_DICT
    if (tp->tp_flags & Py_TPFLAGS_MANAGED_DICT)
        return 1;
#endif
    return tp->tp_dictoffset != 0;
}

/* A dict lookup that cannot fail but for memory: found or not. */
static int
in_dict(PyObject *dict, PyObject *key)
{
    PyObject *v = PyDict_GetItemWithError(dict, key);
    PyErr_Clear();
    return v != NULL;
}

/* Whether a reducer is registered for tp with copyreg or ForkingPickler
 * (`reducers`): pickle then uses it rather than anything of tp's own. */
static int
has_reducer(PyTypeObject *tp, PyObject *reducers)
{
    return in_dict(K.copyreg_table, (PyObject *)tp) || in_dict(reducers, (PyObject *)tp);
}

/* How pickle rebuilds an instance of tp, if one of the ways above.
 * Reads type dictionaries only: runs no Python code. */
static int
obj_kind(PyTypeObject *tp, PyObject *reducers)
{
    int meta_enum = (PyObject *)Py_TYPE(tp) == K.enum_meta;
    if (!(tp->tp_flags & Py_TPFLAGS_HEAPTYPE) ||
        (Py_TYPE(tp) != &PyType_Type && !meta_enum) ||
        tp->tp_getattro != PyObject_GenericGetAttr ||
        PyType_IsSubtype(tp, &PyType_Type))
        return OBJ_NO;
    if (has_reducer(tp, reducers))
        return OBJ_NO;
    if (meta_enum)
        return _PyType_Lookup(tp, K.s_reduce_ex) == K.enum_reduce_ex &&
               _PyType_Lookup(tp, K.s_reduce) == K.reduce && has_dict(tp)
               ? OBJ_ENUM : OBJ_NO;
    if (_PyType_Lookup(tp, K.s_reduce_ex) != K.reduce_ex ||
        _PyType_Lookup(tp, K.s_reduce) != K.reduce ||
        _PyType_Lookup(tp, K.s_getstate) != K.getstate ||
        _PyType_Lookup(tp, K.s_class) != K.cls ||
        _PyType_Lookup(tp, K.s_getnewargs_ex) != NULL)
        return OBJ_NO;
    PyObject *gna = _PyType_Lookup(tp, K.s_getnewargs);
    if (PyType_IsSubtype(tp, &PyTuple_Type))
        return gna != NULL && PyFunction_Check(gna) &&
               PyFunction_GET_CODE(gna) == K.nt_getnewargs && !has_dict(tp)
               ? OBJ_TUPLE : OBJ_NO;
    if (gna != NULL || _PyType_Lookup(tp, K.s_slots) != NULL || !has_dict(tp) ||
        tp->tp_new != PyBaseObject_Type.tp_new || tp->tp_itemsize != 0)
        return OBJ_NO;
    for (PyTypeObject *b = tp; b != &PyBaseObject_Type; b = b->tp_base)
        if (b == NULL || !(b->tp_flags & Py_TPFLAGS_HEAPTYPE))
            return OBJ_NO;
    return OBJ_DICT;
}

/* tp's module and name (borrowed) if looking them up as pickle names a
 * class finds tp itself: a class at the top level of a module. */
static int
class_name(PyTypeObject *tp, PyObject **mod, PyObject **name)
{
    PyObject *m = PyDict_GetItemWithError(tp->tp_dict, K.s_module);
    PyObject *q = ((PyHeapTypeObject *)tp)->ht_qualname;
    PyErr_Clear();
    if (m == NULL || !PyUnicode_CheckExact(m) || q == NULL ||
        !PyUnicode_CheckExact(q) ||
        PyUnicode_FindChar(q, '.', 0, PyUnicode_GET_LENGTH(q), 1) != -1)
        return 0;
    PyObject *module = PyDict_GetItemWithError(PyImport_GetModuleDict(), m);
    PyErr_Clear();
    if (module == NULL || !PyModule_CheckExact(module))
        return 0;
    PyObject *found = PyDict_GetItemWithError(PyModule_GetDict(module), q);
    PyErr_Clear();
    if (found != (PyObject *)tp)
        return 0;
    *mod = m;
    *name = q;
    return 1;
}

/* A name pickle would look up on the instance before its class's own. */
static int
special_name(PyObject *k)
{
    if (!PyUnicode_CheckExact(k) || !PyUnicode_IS_ASCII(k))
        return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(k);
    const char *c = (const char *)PyUnicode_DATA(k);
    return n >= 4 && c[0] == '_' && c[1] == '_' && c[n - 1] == '_' && c[n - 2] == '_';
}

/* An instance: 'K' module name (a class first met, index nclasses) or
 * 'k' u8 index, then u32 n, n arguments for cls.__new__ after cls, then
 * the state: None, or a dict for its __dict__. */
static int
enc_object(enc *e, PyObject *o, int depth)
{
    PyTypeObject *tp = Py_TYPE(o);
    int i = 0, rc;
    if (e->pk || e->reducers == NULL)
        return ENC_NO;
    while (i < e->nclasses && e->classes[i] != tp)
        i++;
    if (i == e->nclasses) {
        PyObject *mod, *name;
        int kind;
        if (i == CODEC_MAX_CLASSES || (kind = obj_kind(tp, e->reducers)) == OBJ_NO ||
            !class_name(tp, &mod, &name))
            return ENC_NO;
        if ((rc = enc_op(e, 'K')) != ENC_OK || (rc = enc_str(e, mod)) != ENC_OK ||
            (rc = enc_str(e, name)) != ENC_OK)
            return rc;
        e->classes[i] = tp;
        e->kinds[i] = (uint8_t)kind;
        e->nclasses++;
    } else {
        uint8_t h[2] = {'k', (uint8_t)i};
        if ((rc = enc_put(e, h, 2)) != ENC_OK)
            return rc;
    }
    static const uint32_t none = 0, one = 1;
    if (e->kinds[i] == OBJ_ENUM) {
        PyObject *dict = PyObject_GenericGetDict(o, NULL);
        if (dict == NULL)
            return ENC_ERR;
        PyObject *v = PyDict_CheckExact(dict)
                      ? PyDict_GetItemWithError(dict, K.s_value_) : NULL;
        PyErr_Clear();
        rc = v == NULL ? ENC_NO : enc_put(e, &one, 4);
        if (rc == ENC_OK)
            rc = enc_value(e, v, depth + 1);
        Py_DECREF(dict);
        return rc == ENC_OK ? enc_op(e, 'N') : rc;
    }
    /* Pickle gives one object for an instance met twice. */
    if (Py_REFCNT(o) > 1 && (rc = enc_seen(e, o)) != ENC_OK)
        return rc;
    if (e->kinds[i] == OBJ_TUPLE) {
        Py_ssize_t n = PyTuple_GET_SIZE(o);
        uint32_t n32 = (uint32_t)n;
        if (n > UINT32_MAX)
            return ENC_NO;
        rc = enc_put(e, &n32, 4);
        for (Py_ssize_t j = 0; rc == ENC_OK && j < n; j++)
            rc = enc_value(e, PyTuple_GET_ITEM(o, j), depth + 1);
        return rc == ENC_OK ? enc_op(e, 'N') : rc;
    }
    if ((rc = enc_put(e, &none, 4)) != ENC_OK)
        return rc;
    PyObject *dict = PyObject_GenericGetDict(o, NULL);
    if (dict == NULL)
        return ENC_ERR;
    if (!PyDict_CheckExact(dict)) {
        rc = ENC_NO;
    } else if (Py_REFCNT(dict) > 2 && (rc = enc_seen(e, dict)) != ENC_OK) {
        /* held by more than o and us: one dict given to two instances
         * (b.__dict__ = a.__dict__), whose values pickle would share */
    } else if (PyDict_GET_SIZE(dict) == 0) {
        rc = enc_op(e, 'N');
    } else {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (rc == ENC_OK && PyDict_Next(dict, &pos, &k, &v))
            if (special_name(k))
                rc = ENC_NO;
        if (rc == ENC_OK)
            rc = enc_dict(e, dict, depth + 1);
    }
    Py_DECREF(dict);
    return rc;
}

/* ------------------------------------------------------- dates and times */

/*
 * date, time, datetime and timedelta, exact types, and of tzinfos only
 * None and timezone.utc (which pickle rebuilds as timezone(timedelta(0)),
 * that is timezone.utc again).  Pickle memoizes them, so one met twice is
 * one object after loads(); here, as for an int or a float, it is written
 * each time and arrives as equal objects.  These types go through the
 * pickler's dispatch table, so one a copyreg or ForkingPickler reducer is
 * registered for goes through pickle, judged once per message; objects of
 * these types can only exist once the datetime module is loaded, and the
 * encoder takes its C API then (encode_any).
 */
enum { DT_DATE, DT_TIME, DT_DATETIME, DT_DELTA, DT_TZ };

/* Whether this message may carry values of kind (of type tp). */
static int
dt_allowed(enc *e, int kind, PyTypeObject *tp)
{
    unsigned bit = 1u << kind;
    if (e->dt_ok & bit)
        return 1;
    if ((e->dt_no & bit) || e->reducers == NULL || has_reducer(tp, e->reducers)) {
        e->dt_no |= bit;
        return 0;
    }
    e->dt_ok |= bit;
    return 1;
}

/* The flags byte of a time or datetime: its fold, and whether its tzinfo
 * is UTC; -1 for another tzinfo (pickle). */
static int
dt_flags(enc *e, int fold, PyObject *tz)
{
    if (tz == Py_None)
        return fold;
    if (tz != PyDateTimeAPI->TimeZone_UTC || !dt_allowed(e, DT_TZ, Py_TYPE(tz)))
        return -1;
    return fold | 2;
}

/* A date's (or datetime's) u16 year, u8 month, u8 day at p. */
static void
put_date(uint8_t *p, PyObject *o)
{
    uint16_t y = (uint16_t)PyDateTime_GET_YEAR(o);
    memcpy(p, &y, 2);
    p[2] = (uint8_t)PyDateTime_GET_MONTH(o);
    p[3] = (uint8_t)PyDateTime_GET_DAY(o);
}

/* A time's u8 hour, minute, second, flags and u32 microsecond at p. */
static void
put_clock(uint8_t *p, int hour, int minute, int second, int flags, int us)
{
    uint32_t us32 = (uint32_t)us;
    p[0] = (uint8_t)hour;
    p[1] = (uint8_t)minute;
    p[2] = (uint8_t)second;
    p[3] = (uint8_t)flags;
    memcpy(p + 4, &us32, 4);
}

static int
enc_datetime(enc *e, PyObject *o, PyTypeObject *tp)
{
    const PyDateTime_CAPI *api = PyDateTimeAPI;
    int kind = tp == api->DateTimeType ? DT_DATETIME : tp == api->DateType ? DT_DATE
               : tp == api->TimeType ? DT_TIME : DT_DELTA;
    if (e->pk || !dt_allowed(e, kind, tp))
        return ENC_NO;
    uint8_t h[13];
    int32_t dsu[3];
    int flags;
    switch (kind) {
    case DT_DATE:
        h[0] = 'Y';
        put_date(h + 1, o);
        return enc_put(e, h, 5);
    case DT_DELTA:
        h[0] = 'Q';
        dsu[0] = PyDateTime_DELTA_GET_DAYS(o);
        dsu[1] = PyDateTime_DELTA_GET_SECONDS(o);
        dsu[2] = PyDateTime_DELTA_GET_MICROSECONDS(o);
        memcpy(h + 1, dsu, 12);
        return enc_put(e, h, 13);
    case DT_TIME:
        flags = dt_flags(e, PyDateTime_TIME_GET_FOLD(o), PyDateTime_TIME_GET_TZINFO(o));
        if (flags < 0)
            return ENC_NO;
        h[0] = 'V';
        put_clock(h + 1, PyDateTime_TIME_GET_HOUR(o), PyDateTime_TIME_GET_MINUTE(o),
                  PyDateTime_TIME_GET_SECOND(o), flags,
                  PyDateTime_TIME_GET_MICROSECOND(o));
        return enc_put(e, h, 9);
    default:
        flags = dt_flags(e, PyDateTime_DATE_GET_FOLD(o), PyDateTime_DATE_GET_TZINFO(o));
        if (flags < 0)
            return ENC_NO;
        h[0] = 'W';
        put_date(h + 1, o);
        put_clock(h + 5, PyDateTime_DATE_GET_HOUR(o), PyDateTime_DATE_GET_MINUTE(o),
                  PyDateTime_DATE_GET_SECOND(o), flags,
                  PyDateTime_DATE_GET_MICROSECOND(o));
        return enc_put(e, h, 13);
    }
}

/* The datetime C API, taken once the module is loaded (by anyone: until
 * then no date or time object exists to be sent).  Called before a walk,
 * which must run no Python code, never during one. */
static void
dt_take_api(void)
{
    static int failed;
    if (failed)
        return;
    PyObject *m = PyDict_GetItemWithError(PyImport_GetModuleDict(),
                                          K.s_datetime_mod);
    if (m == NULL) {
        PyErr_Clear();
        return;
    }
    PyDateTime_IMPORT;
    if (PyDateTimeAPI == NULL) {
        PyErr_Clear();
        failed = 1;
    }
}

/* The items of a list being sent as n items[]: a list message, as if
 * items were a list of their own.  Only the container they are in
 * references an item of refcount 1, so that item is met once: the shared
 * reference check is skipped for it, as for any container of refcount 1. */
static int
enc_items(enc *e, PyObject *const *items, Py_ssize_t n)
{
    int rc = enc_len(e, 'l', 0, 0, 0, (size_t)n);
    if (rc == ENC_OK && e->len + (size_t)n > e->max) {
        e->too_big = 1;
        rc = ENC_NO;
    }
    for (Py_ssize_t i = 0; rc == ENC_OK && i < n; i++) {
        PyObject *o = items[i];
        PyTypeObject *tp = Py_TYPE(o);
        if (Py_REFCNT(o) == 1 && (tp == &PyTuple_Type || tp == &PyList_Type))
            rc = enc_seq(e, o, 1);
        else
            rc = enc_value(e, o, 1);
    }
    return rc;
}

/* obj (or, if obj is NULL, the n items[] as a list) in this encoding (pk
 * 0) or as a pickle (pk 1, obj only), as bytes; None if it is not plain
 * data or takes more than max_bytes (*too_big is set then). */
static PyObject *
encode_any(PyObject *obj, PyObject *const *items, Py_ssize_t n,
           size_t max_bytes, int pk, int *too_big)
{
    uint8_t stack[STACK_BYTES];
    enc e = {.buf = stack, .cap = sizeof stack, .max = max_bytes, .pk = pk,
             .seen_cap = 32};
    e.seen = e.seen_small;
    memset(e.seen_small, 0, sizeof e.seen_small);
    /* ForkingPickler's reducers, which the first pickled message imports
     * (msg.c: cp_fp_reducers): until then, objects go through pickle.
     * Importing them here, for every process's first message of plain
     * data, would cost each worker memory it may never need. */
    e.reducers = cp_state->fp_reducers;
    if (!pk && PyDateTimeAPI == NULL)
        dt_take_api();
    static const uint8_t proto[2] = {PK_PROTO, 5};
    int rc = pk ? enc_put(&e, proto, 2) : enc_op(&e, CP_CODEC_MAGIC);
    if (rc == ENC_OK)
        rc = obj ? enc_value(&e, obj, 0) : enc_items(&e, items, n);
    if (rc == ENC_OK && pk)
        rc = enc_op(&e, PK_STOP);
    PyObject *res = NULL;
    if (rc == ENC_OK)
        res = PyBytes_FromStringAndSize((const char *)e.buf, (Py_ssize_t)e.len);
    if (e.heap)
        PyMem_Free(e.buf);
    if (e.seen != e.seen_small)
        PyMem_Free(e.seen);
    if (too_big)
        *too_big = e.too_big;
    if (rc == ENC_NO)
        return Py_NewRef(Py_None);
    return res;
}

static PyObject *
encode(PyObject *obj, size_t max_bytes, int pk, int *too_big)
{
    return encode_any(obj, NULL, 0, max_bytes, pk, too_big);
}

PyObject *
cp_codec_encode(PyObject *obj, uint64_t max_bytes)
{
    return encode(obj, (size_t)max_bytes, 0, NULL);
}

PyObject *
cp_codec_pickle(PyObject *Py_UNUSED(m), PyObject *obj)
{
    return encode(obj, SIZE_MAX, 1, NULL);
}

/* ------------------------------------------------------------ decoding */

/*
 * Short strings and bytes met again within one message are decoded once: a
 * list of records repeats its dict keys in every record, and pickle's memo
 * gives the receiver one key object for all of them (the encoder wrote each
 * occurrence).  A small cache of what this message has decoded so far,
 * keyed by the value's bytes in the message (see dec_atom_get), shares them
 * again, which halves the memory a list of small dicts takes and spares
 * making and hashing each key.  Longer ones met twice never get here (the
 * encoder sends such messages as pickles).  Equal values that were distinct
 * objects in the sender become one object too, which nothing can tell
 * apart but `is`, as with CPython's own interning.
 */
#define ATOM_SLOTS 128              /* a power of two */
#define ATOM_PROBE 4                /* slots looked at from a value's own */
#define ATOM_TRIAL 512              /* lookups before the hits are judged */

typedef struct {
    PyObject *obj;
    const uint8_t *src;             /* its bytes in the message */
    uint64_t hash;
    int hot;                        /* met again since it was decoded */
} dec_atom;

typedef struct {
    const uint8_t *p, *end;
    uint64_t used[ATOM_SLOTS / 64]; /* bit i: atoms[i] holds a value */
    unsigned evict;                 /* which of a full run of slots goes */
    uint32_t lookups, hits;         /* few hits: the cache is left alone */
    dec_atom atoms[ATOM_SLOTS];
    int nclasses;                   /* the classes of objects ('K') */
    struct dec_class {
        PyObject *cls, *new;        /* new: cls.__new__ */
        int plain;                  /* no __setstate__, generic attributes */
        int object_new;             /* new is object.__new__, tp_new its */
        int is_enum;                /* an Enum: cls(value) finds a member */
    } classes[CODEC_MAX_CLASSES];
} dec;

#define ATOM_USED(d, i) ((d)->used[(i) / 64] >> ((i) % 64) & 1)

static void
dec_release(dec *d)
{
    for (unsigned w = 0; w < ATOM_SLOTS / 64; w++) {
        for (uint64_t u = d->used[w]; u; u &= u - 1)
            Py_DECREF(d->atoms[w * 64 + (unsigned)__builtin_ctzll(u)].obj);
        d->used[w] = 0;
    }
    for (int i = 0; i < d->nclasses; i++) {
        Py_DECREF(d->classes[i].cls);
        Py_DECREF(d->classes[i].new);
    }
    d->nclasses = 0;
}

/* ascii: the caller saw that every byte is below 0x80 */
static PyObject *
make_atom(uint8_t tag, const uint8_t *s, uint32_t n, int ascii)
{
    if (tag == 'b')
        return PyBytes_FromStringAndSize((const char *)s, n);
    if (!ascii)
        return PyUnicode_DecodeUTF8((const char *)s, n, NULL);
    PyObject *o = PyUnicode_New(n, 127);
    if (o != NULL)
        memcpy(PyUnicode_DATA(o), s, n);
    return o;
}

/* The str ('s') or bytes ('b') of the n bytes at s, from the cache when it
 * has it. */
static PyObject *
dec_atom_get(dec *d, uint8_t tag, const uint8_t *s, uint32_t n)
{
    /* The encoder counts a str's length in characters, of up to 4 bytes. */
    if (n == 0 || n >= (tag == 's' ? 4 : 1) * CODEC_SHARED_ATOM)
        return make_atom(tag, s, n, 0);
    /* A hash of the length, the tag and the first and last 8 bytes (which
     * overlap, or are one short run, for shorter values). */
    uint64_t lo = 0, hi = 0;
    if (n >= 8) {
        memcpy(&lo, s, 8);
        memcpy(&hi, s + n - 8, 8);
    } else {
        memcpy(&lo, s, n);
    }
    int ascii = n <= 16 && ((lo | hi) & UINT64_C(0x8080808080808080)) == 0;
    /* A message of mostly distinct values (a list of words) would pay for
     * looking up and replacing every one of them. */
    if (d->lookups >= ATOM_TRIAL && d->hits < d->lookups / 8)
        return make_atom(tag, s, n, ascii);
    d->lookups++;
    uint64_t h = (lo * UINT64_C(0x9E3779B97F4A7C15)) ^
                 ((hi ^ ((uint64_t)n << 8 | tag)) * UINT64_C(0xC2B2AE3D27D4EB4F));
    unsigned home = (unsigned)(h >> 57), slot = ATOM_SLOTS;
    for (unsigned j = 0; j < ATOM_PROBE; j++) {
        unsigned i = (home + j) & (ATOM_SLOTS - 1);
        if (!ATOM_USED(d, i)) {
            slot = i;
            break;
        }
        dec_atom *a = &d->atoms[i];
        /* In the message, the tag and the length are the 5 bytes before
         * the value's own: the same tag, length and bytes. */
        if (a->hash == h && a->src[-5] == tag &&
            memcmp(a->src - 4, s - 4, 4) == 0 && memcmp(a->src, s, n) == 0) {
            d->hits++;
            a->hot = 1;
            return Py_NewRef(a->obj);
        }
    }
    PyObject *o = make_atom(tag, s, n, ascii);
    if (o == NULL)
        return NULL;
    if (slot == ATOM_SLOTS) {
        /* A full run: one that was not met again goes (the keys of
         * records stay, their distinct values come and go); if all were,
         * this one is not kept. */
        d->evict++;
        for (unsigned j = 0; j < ATOM_PROBE && slot == ATOM_SLOTS; j++) {
            unsigned i = (home + (d->evict + j) % ATOM_PROBE) & (ATOM_SLOTS - 1);
            if (!d->atoms[i].hot)
                slot = i;
        }
        if (slot == ATOM_SLOTS)
            return o;
        Py_DECREF(d->atoms[slot].obj);
    }
    d->atoms[slot] = (dec_atom){Py_NewRef(o), s, h, 0};
    d->used[slot / 64] |= (uint64_t)1 << (slot % 64);
    return o;
}

static PyObject *
malformed(void)
{
    PyErr_SetString(PyExc_RuntimeError, "cpool: malformed plain-data message");
    return NULL;
}

/* Copy the next n bytes of the message to dst; -1 if there are fewer. */
static int
dec_take(dec *d, void *dst, size_t n)
{
    if ((size_t)(d->end - d->p) < n)
        return -1;
    memcpy(dst, d->p, n);
    d->p += n;
    return 0;
}

static int
dec_u32(dec *d, uint32_t *n)
{
    return dec_take(d, n, 4);
}

static PyObject *dec_value(dec *d, int depth);

#if PY_VERSION_HEX >= 0x030D0000
#define lookup_attr PyObject_GetOptionalAttr
#else
#define lookup_attr _PyObject_LookupAttr
#endif

/* 'K': find the class as pickle's find_class() does (importing its module
 * if need be) and make it the message's next one. */
static int
dec_class(dec *d, int depth)
{
    if (d->nclasses == CODEC_MAX_CLASSES)
        return malformed(), -1;
    PyObject *mod = dec_value(d, depth + 1);
    PyObject *name = mod ? dec_value(d, depth + 1) : NULL;
    PyObject *m = NULL, *cls = NULL, *new = NULL;
    if (name != NULL && (!PyUnicode_CheckExact(mod) || !PyUnicode_CheckExact(name)))
        malformed();
    else if (name != NULL && (m = PyImport_Import(mod)) != NULL &&
             (cls = PyObject_GetAttr(m, name)) != NULL) {
        if (PyType_Check(cls))
            new = PyObject_GetAttr(cls, K.s_new);
        else
            PyErr_Format(PyExc_TypeError, "cpool: %U.%U is not a class here",
                         mod, name);
    }
    Py_XDECREF(mod);
    Py_XDECREF(name);
    Py_XDECREF(m);
    if (new == NULL) {
        Py_XDECREF(cls);
        return -1;
    }
    PyTypeObject *tp = (PyTypeObject *)cls;
    d->classes[d->nclasses++] = (struct dec_class){
        cls, new,
        tp->tp_getattro == PyObject_GenericGetAttr &&
            _PyType_Lookup(tp, K.s_setstate) == NULL,
        new == K.object_new && tp->tp_new == PyBaseObject_Type.tp_new,
        (PyObject *)Py_TYPE(cls) == K.enum_meta};
    return 0;
}

/* dict[k] = v as pickle's BUILD sets it, a str key interned (before 3.13:
 * from 3.13, PyUnicode_InternInPlace() makes a string immortal, and every
 * distinct key of every message would stay for good); k stolen. */
static int
set_state_item(PyObject *dict, PyObject *k, PyObject *v)
{
#if PY_VERSION_HEX < 0x030D0000
    if (PyUnicode_CheckExact(k))
        PyUnicode_InternInPlace(&k);
#endif
    int rc = PyObject_SetItem(dict, k, v);
    Py_DECREF(k);
    return rc;
}

/* pickle's BUILD with a dict: o.__setstate__(state) if it has one, else
 * the items go into o.__dict__, string keys interned. */
static int
dec_build(PyObject *o, PyObject *state, const struct dec_class *c)
{
    PyObject *f = NULL;
    if (!c->plain && lookup_attr(o, K.s_setstate, &f) < 0)
        return -1;
    if (f != NULL) {
        PyObject *r = PyObject_CallOneArg(f, state);
        Py_DECREF(f);
        Py_XDECREF(r);
        return r == NULL ? -1 : 0;
    }
    PyObject *dict = PyObject_GetAttr(o, K.s_dict);
    if (dict == NULL)
        return -1;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    int rc = 0;
    while (rc == 0 && PyDict_Next(state, &pos, &k, &v))
        rc = set_state_item(dict, Py_NewRef(k), v);
    Py_DECREF(dict);
    return rc;
}

/* The same for a class without __setstate__, from the message: its 'D'
 * pairs go into o.__dict__ as they are decoded. */
static int
dec_build_plain(dec *d, PyObject *o, int depth)
{
    uint32_t n;
    d->p++;
    if (dec_u32(d, &n) < 0 || (size_t)(d->end - d->p) / 2 < n)
        return malformed(), -1;
    PyObject *dict = PyObject_GetAttr(o, K.s_dict);
    if (dict == NULL)
        return -1;
    int rc = 0;
    for (uint32_t i = 0; rc == 0 && i < n; i++) {
        PyObject *k = dec_value(d, depth + 1);
        PyObject *v = k ? dec_value(d, depth + 1) : NULL;
        if (v == NULL) {
            Py_XDECREF(k);
            rc = -1;
        } else {
            rc = set_state_item(dict, k, v);
            Py_DECREF(v);
        }
    }
    Py_DECREF(dict);
    return rc;
}

/* The state of o, just made: None or a dict (pickle's BUILD).  Returns o,
 * or NULL (o released). */
static PyObject *
dec_state(dec *d, PyObject *o, const struct dec_class *c, int depth)
{
    if (c->plain && d->p < d->end && *d->p == 'D') {
        if (dec_build_plain(d, o, depth) < 0)
            Py_CLEAR(o);
        return o;
    }
    PyObject *state = dec_value(d, depth + 1);
    if (state == NULL || (state != Py_None && !PyDict_CheckExact(state))) {
        if (state != NULL)
            malformed();
        Py_XDECREF(state);
        Py_DECREF(o);
        return NULL;
    }
    if (state != Py_None && dec_build(o, state, c) < 0)
        Py_CLEAR(o);
    Py_DECREF(state);
    return o;
}

/* An instance of class c (see enc_object): cls.__new__(cls, *args), then
 * its state, as pickle's NEWOBJ and BUILD. */
static PyObject *
dec_object(dec *d, const struct dec_class *c, int depth)
{
    uint32_t n;
    if (dec_u32(d, &n) < 0 || (size_t)(d->end - d->p) < n)
        return malformed();
    PyObject *o;
    if (c->is_enum) {
        /* cls(value), as pickle's REDUCE of what Enum.__reduce_ex__ gave;
         * no state (a member's attributes are not the message's to set) */
        PyObject *v = n == 1 ? dec_value(d, depth + 1) : malformed();
        o = v ? PyObject_CallOneArg(c->cls, v) : NULL;
        Py_XDECREF(v);
        if (o != NULL && (d->p >= d->end || *d->p++ != 'N')) {
            Py_DECREF(o);
            return malformed();
        }
        return o;
    }
    if (n == 0 && c->object_new) {
        /* object.__new__(cls), without its wrapper's argument tuple */
        PyTypeObject *tp = (PyTypeObject *)c->cls;
        o = tp->tp_new(tp, K.empty, NULL);
        return o ? dec_state(d, o, c, depth) : NULL;
    }
    PyObject *small[8], **args = small;
    if (n + 1 > sizeof small / sizeof small[0] &&
        (args = PyMem_Malloc(((size_t)n + 1) * sizeof *args)) == NULL)
        return PyErr_NoMemory();
    args[0] = c->cls;
    uint32_t got = 0;
    while (got < n && (args[got + 1] = dec_value(d, depth + 1)) != NULL)
        got++;
    o = got == n ? PyObject_Vectorcall(c->new, args, n + 1, NULL) : NULL;
    for (uint32_t i = 0; i < got; i++)
        Py_DECREF(args[i + 1]);
    if (args != small)
        PyMem_Free(args);
    return o ? dec_state(d, o, c, depth) : NULL;
}

/* 'S' or 'R': a set or frozenset of n values. */
static PyObject *
dec_set(dec *d, uint8_t tag, int depth)
{
    uint32_t n;
    if (dec_u32(d, &n) < 0 || (size_t)(d->end - d->p) < n)
        return malformed();
    /* A new frozenset is filled as a new set is, before anyone sees it. */
    PyObject *o = tag == 'S' ? PySet_New(NULL) : PyFrozenSet_New(NULL);
    for (uint32_t i = 0; o != NULL && i < n; i++) {
        PyObject *v = dec_value(d, depth + 1);
        if (v == NULL || PySet_Add(o, v) < 0)
            Py_CLEAR(o);
        Py_XDECREF(v);
    }
    return o;
}

/* 'Y', 'V', 'W', 'Q': a date, time, datetime or timedelta (enc_datetime),
 * made as pickle makes it (its C constructor).  Values no such object can
 * have make the message malformed. */
static PyObject *
dec_datetime(dec *d, uint8_t tag)
{
    uint8_t b[12];
    if (dec_take(d, b, tag == 'Y' ? 4 : tag == 'V' ? 8 : 12) < 0)
        return malformed();
    if (PyDateTimeAPI == NULL) {
        PyDateTime_IMPORT;              /* as pickle would import it */
        if (PyDateTimeAPI == NULL)
            return NULL;
    }
    const PyDateTime_CAPI *api = PyDateTimeAPI;
    uint16_t y;
    uint32_t us;
    int32_t dsu[3];
    int flags = tag == 'V' ? b[3] : tag == 'W' ? b[7] : 0;
    PyObject *o, *tz = flags & 2 ? api->TimeZone_UTC : Py_None;
    if (flags > 3)
        return malformed();
    switch (tag) {
    case 'Y':
        memcpy(&y, b, 2);
        o = api->Date_FromDate(y, b[2], b[3], api->DateType);
        break;
    case 'Q':
        memcpy(dsu, b, 12);
        o = api->Delta_FromDelta(dsu[0], dsu[1], dsu[2], 1, api->DeltaType);
        break;
    case 'V':
        memcpy(&us, b + 4, 4);
        o = us > 999999 ? malformed()
                        : api->Time_FromTimeAndFold(b[0], b[1], b[2], (int)us, tz,
                                                    flags & 1, api->TimeType);
        break;
    default:
        memcpy(&y, b, 2);
        memcpy(&us, b + 8, 4);
        o = us > 999999 ? malformed()
                        : api->DateTime_FromDateAndTimeAndFold(
                              y, b[2], b[3], b[4], b[5], b[6], (int)us, tz,
                              flags & 1, api->DateTimeType);
    }
    if (o == NULL && (PyErr_ExceptionMatches(PyExc_ValueError) ||
                      PyErr_ExceptionMatches(PyExc_OverflowError))) {
        PyErr_Clear();
        return malformed();
    }
    return o;
}

static PyObject *
dec_value(dec *d, int depth)
{
    if (d->p >= d->end || depth > CODEC_MAX_DEPTH)
        return malformed();
    uint8_t tag = *d->p++;
    uint32_t n;
    switch (tag) {
    case 'N':
        Py_RETURN_NONE;
    case 'T':
        Py_RETURN_TRUE;
    case 'F':
        Py_RETURN_FALSE;
    case 'j': {
        int32_t v;
        return dec_take(d, &v, 4) < 0 ? malformed() : PyLong_FromLong(v);
    }
    case 'i': {
        int64_t v;
        return dec_take(d, &v, 8) < 0 ? malformed() : PyLong_FromLongLong(v);
    }
    case 'd': {
        double v;
        return dec_take(d, &v, 8) < 0 ? malformed() : PyFloat_FromDouble(v);
    }
    case 'I':
    case 's':
    case 'b': {
        if (dec_u32(d, &n) < 0 || (size_t)(d->end - d->p) < n ||
            (tag == 'I' && n == 0))
            return malformed();
        const uint8_t *s = d->p;
        d->p += n;
        if (tag == 'I')
            return _PyLong_FromByteArray(s, n, 1, 1);
        return dec_atom_get(d, tag, s, n);
    }
    case 't':
    case 'l': {
        /* Each value takes at least one byte: a bound on n before allocating. */
        if (dec_u32(d, &n) < 0 || (size_t)(d->end - d->p) < n)
            return malformed();
        PyObject *o = tag == 't' ? PyTuple_New(n) : PyList_New(n);
        if (o == NULL)
            return NULL;
        int atomic = 1;
        for (uint32_t i = 0; i < n; i++) {
            PyObject *v = dec_value(d, depth + 1);
            if (v == NULL) {
                Py_DECREF(o);
                return NULL;
            }
            if (tag == 't') {
                PyTuple_SET_ITEM(o, i, v);
                /* As CPython's own rule: a dict or list may become
                 * tracked later even if it is not now; a tuple cannot. */
                atomic &= !PyObject_IS_GC(v) ||
                          (PyTuple_CheckExact(v) && !PyObject_GC_IsTracked(v));
            } else {
                PyList_SET_ITEM(o, i, v);
            }
        }
        /* What the collector would do on its first pass over it: a tuple
         * of atomic items can be in no cycle.  Untracked now, a chunk's
         * thousands of argument tuples cost the collector nothing. */
        if (tag == 't' && atomic && n > 0)
            PyObject_GC_UnTrack(o);
        return o;
    }
    case 'D': {
        if (dec_u32(d, &n) < 0 || (size_t)(d->end - d->p) / 2 < n)
            return malformed();
        PyObject *o = PyDict_New();
        for (uint32_t i = 0; o != NULL && i < n; i++) {
            PyObject *k = dec_value(d, depth + 1);
            PyObject *v = k ? dec_value(d, depth + 1) : NULL;
            if (v == NULL || PyDict_SetItem(o, k, v) < 0)
                Py_CLEAR(o);
            Py_XDECREF(k);
            Py_XDECREF(v);
        }
        return o;
    }
    case 'S':
    case 'R':
        return dec_set(d, tag, depth);
    case 'Y':
    case 'V':
    case 'W':
    case 'Q':
        return dec_datetime(d, tag);
    case 'K':
        if (dec_class(d, depth) < 0)
            return NULL;
        return dec_object(d, &d->classes[d->nclasses - 1], depth);
    case 'k': {
        uint8_t i;
        if (dec_take(d, &i, 1) < 0 || i >= d->nclasses)
            return malformed();
        return dec_object(d, &d->classes[i], depth);
    }
    default:
        return malformed();
    }
}

PyObject *
cp_codec_decode(const uint8_t *p, uint64_t n)
{
    if (n < 1 || p[0] != CP_CODEC_MAGIC)
        return malformed();
    dec d;                  /* atoms[] is read only where `used` says */
    d.p = p + 1;
    d.end = p + n;
    memset(d.used, 0, sizeof d.used);
    d.evict = d.lookups = d.hits = 0;
    d.nclasses = 0;
    PyObject *o = dec_value(&d, 0);
    dec_release(&d);
    if (o != NULL && d.p != d.end) {
        Py_DECREF(o);
        return malformed();
    }
    return o;
}

/* ------------------------------------------------------------ messages */

/* obj (or, if obj is NULL, the n items[] as a list) as a message in this
 * encoding: bytes, within max_plain if it fits one ring record, else whole
 * (sent in fragments; decoding it costs half of unpickling the same data,
 * most of which is making ints out of LONG1 opcodes).  None if it is not
 * plain data. */
static PyObject *
encode_msg(PyObject *obj, PyObject *const *items, Py_ssize_t n,
           uint64_t max_plain)
{
    /* A long list or tuple cannot fit one record (an item takes a byte at
     * least, an int five): do not try. */
    Py_ssize_t count = n;
    if (obj != NULL)
        count = PyList_CheckExact(obj) || PyTuple_CheckExact(obj)
                ? PySequence_Fast_GET_SIZE(obj) : 0;
    int too_big = (uint64_t)count > max_plain / 4;
    PyObject *b = too_big ? Py_NewRef(Py_None)
                          : encode_any(obj, items, n, (size_t)max_plain, 0, &too_big);
    if (b == Py_None && too_big) {
        Py_DECREF(b);
        b = encode_any(obj, items, n, SIZE_MAX, 0, NULL);
    }
    return b;
}

PyObject *
cp_dumps(PyObject *obj, int big_hint, uint64_t max_plain, int *oob,
         const cp_arena_use *au)
{
    *oob = 0;
    if (!big_hint) {
        PyObject *b = encode_msg(obj, NULL, 0, max_plain);
        if (b != Py_None)
            return b;
        Py_DECREF(b);
    }
    return cp_msg_dumps(obj, big_hint, oob, au);
}

/* cp_dumps() of a list of the n items[] when they are plain data: bytes;
 * None if they are not (send a real list through cp_dumps() then). */
PyObject *
cp_dumps_items(PyObject *const *items, Py_ssize_t n, uint64_t max_plain)
{
    return encode_msg(NULL, items, n, max_plain);
}

PyObject *
cp_loads(const uint8_t *p, uint64_t n)
{
    if (n >= 1 && p[0] == CP_CODEC_MAGIC)
        return cp_codec_decode(p, n);
    PyObject *mv = PyMemoryView_FromMemory((char *)p, (Py_ssize_t)n, PyBUF_READ);
    if (mv == NULL)
        return NULL;
    PyObject *obj = cp_unpickle(mv, p, n, NULL, NULL);
    PyObject *err = obj == NULL ? cp_err_take() : NULL;
    /* The bytes are about to be reused by the other side: make sure nothing
     * kept a view of them. */
    PyObject *r = PyObject_CallMethodNoArgs(mv, cp_state->str_release);
    if (r == NULL) {
        Py_CLEAR(obj);
        Py_XDECREF(err);
        err = cp_err_take();
    }
    Py_XDECREF(r);
    Py_DECREF(mv);
    if (err != NULL)
        PyErr_SetObject((PyObject *)Py_TYPE(err), err);
    Py_XDECREF(err);
    return obj;
}

/* ------------------------------------------------- for the tests */

PyObject *
cp_codec_encode_plain_py(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    unsigned long long max = 1 << 20;
    if (nargs < 1 || nargs > 2 ||
        (nargs == 2 && (max = PyLong_AsUnsignedLongLong(args[1])) == (unsigned long long)-1 &&
         PyErr_Occurred())) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "encode_plain(obj, max_bytes=2**20)");
        return NULL;
    }
    cp_fp_reducers();       /* as a message pickled before would have */
    return cp_codec_encode(args[0], max);
}

PyObject *
cp_codec_loads_py(PyObject *Py_UNUSED(m), PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *o = cp_loads(b.buf, (uint64_t)b.len);
    PyBuffer_Release(&b);
    return o;
}
