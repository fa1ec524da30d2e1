/* Included by procshare's C extensions that read procshare's own slotted
 * objects (_cview.c, _engine/_cengine.c; the backend's _forkfast.c and
 * _robustmutex.c find their offsets with ps_member_offset): a field read
 * without an attribute lookup.
 *
 * Why: a freshly forked child runs the C open and close paths once, for the
 * first time in its life, and every page it writes there is a page the
 * kernel copies. PyObject_GetAttr on a slotted instance writes three places
 * besides the value's own reference count: the type's lookup cache (a miss in
 * the child: an entry written, its name's reference taken, the old name's
 * dropped), the slot descriptor's reference count, and the type's MRO tuple.
 * Reading the field at its offset writes none of them. The offset is found
 * once, at setup, from the slot's member descriptor; a read checks that the
 * object is exactly of that type (a subclass may have made the name a
 * property) and otherwise does the attribute lookup, so the read always
 * means what `obj.name` means. */

#ifndef PROCSHARE_SLOTS_H
#define PROCSHARE_SLOTS_H

#include <Python.h>
#include <structmember.h>

typedef struct {
    PyTypeObject *type; /* (a strong reference, kept for the process's life) */
    Py_ssize_t offset;
} ps_slot;

/* The offset of `name`, a slot (a T_OBJECT_EX or T_OBJECT member) of `type`,
 * as attribute lookup on the class finds it (a subclass's property of that
 * name is not a slot): 0, or -1 with TypeError (`who` names the setup call). */
static inline int
ps_member_offset(PyTypeObject *type, const char *name, Py_ssize_t *out, const char *who)
{
    PyObject *descr = PyObject_GetAttrString((PyObject *)type, name);
    if (descr == NULL)
        return -1;
    int ok = PyObject_TypeCheck(descr, &PyMemberDescr_Type) &&
             (((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX ||
              ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT);
    if (ok)
        *out = ((PyMemberDescrObject *)descr)->d_member->offset;
    Py_DECREF(descr);
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s: %s.%s is not a slot", who, type->tp_name, name);
        return -1;
    }
    return 0;
}

/* Find `name`, a slot of the class `type`, for ps_slot_peek and ps_slot_get. */
static inline int
ps_slot_find(ps_slot *slot, PyObject *type, const char *name, const char *who)
{
    if (!PyType_Check(type)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a class for slot %s", who, name);
        return -1;
    }
    if (ps_member_offset((PyTypeObject *)type, name, &slot->offset, who) < 0)
        return -1;
    Py_INCREF(type);
    Py_XSETREF(slot->type, (PyTypeObject *)type);
    return 0;
}

/* One slot to find: where to keep it, the class, the slot's name. */
typedef struct {
    ps_slot *slot;
    PyObject *type;
    const char *name;
} ps_slot_spec;

/* Find each of `n` slots (ps_slot_find): 0, or -1 with TypeError. */
static inline int
ps_slots_find(const ps_slot_spec *specs, size_t n, const char *who)
{
    for (size_t i = 0; i < n; i++)
        if (ps_slot_find(specs[i].slot, specs[i].type, specs[i].name, who) < 0)
            return -1;
    return 0;
}

/* Borrowed: obj's field, when obj is exactly of the slot's type and the field
 * is set; else NULL, with no exception (the caller looks the attribute up).
 * Valid only until Python code may run (it could replace the field). */
static inline PyObject *
ps_slot_peek(const ps_slot *slot, PyObject *obj)
{
    if (slot->type == NULL || Py_TYPE(obj) != slot->type)
        return NULL;
    return *(PyObject **)((char *)obj + slot->offset);
}

/* New reference: obj.name, read at the slot's offset when it can be. */
static inline PyObject *
ps_slot_get(const ps_slot *slot, PyObject *obj, PyObject *name)
{
    PyObject *value = ps_slot_peek(slot, obj);
    return value != NULL ? Py_NewRef(value) : PyObject_GetAttr(obj, name);
}

/* obj.name is truthy: 1, 0, or -1 with an exception set. */
static inline int
ps_slot_true(const ps_slot *slot, PyObject *obj, PyObject *name)
{
    PyObject *value = ps_slot_peek(slot, obj);
    if (value == Py_True || value == Py_False)
        return value == Py_True;
    value = value != NULL ? Py_NewRef(value) : PyObject_GetAttr(obj, name);
    if (value == NULL)
        return -1;
    int truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

#endif
