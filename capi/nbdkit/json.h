/*
 * A small JSON reader and writer for the filter's QMP control socket (control.c).
 *
 * The reader parses one complete JSON text held in memory (the control socket frames
 * messages first, see json_frame) into a tree allocated in one arena: bounded by the input
 * (at most one node per input byte) and by JSON_MAX_DEPTH nesting levels. It accepts RFC 8259
 * JSON only (no comments, no single quotes, no trailing commas; strings must be valid UTF-8
 * without NUL; numbers are kept as text and read as integers on demand). Bad input returns
 * NULL with a message; it never reads past the buffer nor recurses deeper than the limit.
 *
 * The writer appends to a growable buffer with a hard size limit (json_buf); a failed append
 * (out of memory, over the limit) sets `failed` and later appends do nothing.
 *
 * Not thread-safe by itself: a tree or buffer belongs to the thread that made it.
 */
#ifndef COWBACKUP_NBDKIT_JSON_H
#define COWBACKUP_NBDKIT_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define JSON_MAX_DEPTH 32

enum json_type { JSON_NULL, JSON_FALSE, JSON_TRUE, JSON_NUMBER, JSON_STRING, JSON_ARRAY,
                 JSON_OBJECT };

struct json {
    enum json_type type;
    const char *str;        /* STRING: the decoded text (NUL-terminated, no NUL inside);
                               NUMBER: its text as written; object member: the key */
    size_t len;             /* STRING: bytes of str; ARRAY/OBJECT: number of children */
    struct json *child;     /* ARRAY/OBJECT: first element/member */
    struct json *next;      /* next sibling */
    const char *key;        /* a member of an object: its key (decoded) */
};

/* The tree of one parse; free with json_free. */
struct json_doc {
    struct json *root;
    char *arena;            /* nodes and decoded strings */
};

/* Parse `len` bytes at `text` (need not be NUL-terminated). Returns 0 and fills *doc, or -1
 * with a message in err (errlen bytes). */
int json_parse(const char *text, size_t len, struct json_doc *doc, char *err, size_t errlen);
void json_free(struct json_doc *doc);

/* The member `key` of an object, NULL when absent or `obj` is not an object. */
const struct json *json_get(const struct json *obj, const char *key);
/* A NUMBER that is a non-negative integer fitting in uint64_t / an integer in int64_t. */
bool json_u64(const struct json *v, uint64_t *out);
bool json_i64(const struct json *v, int64_t *out);
const char *json_type_name(enum json_type t);

/* Framing of a byte stream into JSON texts (QMP does not need newlines between messages):
 * feed bytes one at a time; returns 1 when the byte ends a complete top-level value,
 * 0 otherwise. A top-level scalar ends at the first byte that cannot continue it. */
struct json_frame {
    int depth;
    bool in_string, escape, started, scalar;
};
int json_frame_byte(struct json_frame *f, char c);

/* Output buffer. */
struct json_buf {
    char *data;
    size_t len, cap, limit;
    bool failed;
};
void jb_init(struct json_buf *b, size_t limit);
void jb_free(struct json_buf *b);
void jb_raw(struct json_buf *b, const char *s, size_t n);
void jb_printf(struct json_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* A JSON string literal of the n bytes at s (escaped; invalid UTF-8 bytes become U+FFFD). */
void jb_str(struct json_buf *b, const char *s, size_t n);
void jb_cstr(struct json_buf *b, const char *s);
/* The value v written back as compact JSON. */
void jb_value(struct json_buf *b, const struct json *v);

#endif
