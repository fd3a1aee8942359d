/* A small JSON reader and writer for the QMP control socket: see json.h. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

/* ---- arena: blocks of memory freed together ---- */

struct block {
    struct block *next;
    size_t used, cap;
    _Alignas(max_align_t) char data[];
};

struct parser {
    const char *p, *end;
    struct block *blocks;
    char *err;
    size_t errlen;
    bool failed;
};

static void *arena_alloc(struct parser *ps, size_t n)
{
    n = (n + 15) & ~(size_t)15;
    struct block *b = ps->blocks;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > 16384 ? n : 16384;
        b = malloc(sizeof *b + cap);
        if (!b)
            return NULL;
        b->next = ps->blocks, b->used = 0, b->cap = cap;
        ps->blocks = b;
    }
    void *r = b->data + b->used;
    b->used += n;
    return r;
}

static void fail(struct parser *ps, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(struct parser *ps, const char *fmt, ...)
{
    if (ps->failed)
        return;
    ps->failed = true;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ps->err, ps->errlen, fmt, ap);
    va_end(ap);
}

static void skip_ws(struct parser *ps)
{
    while (ps->p < ps->end &&
           (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
        ps->p++;
}

static struct json *new_node(struct parser *ps, enum json_type t)
{
    struct json *n = arena_alloc(ps, sizeof *n);
    if (!n) {
        fail(ps, "out of memory");
        return NULL;
    }
    memset(n, 0, sizeof *n);
    n->type = t;
    return n;
}

static int hex4(const char *s, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return -1;
    }
    *out = v;
    return 0;
}

/* Length of the valid UTF-8 sequence at s (at most n bytes), 0 if invalid. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    size_t len;
    unsigned min;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf)
        len = 2, min = 0x80;
    else if (c >= 0xe0 && c <= 0xef)
        len = 3, min = 0x800;
    else if (c >= 0xf0 && c <= 0xf4)
        len = 4, min = 0x10000;
    else
        return 0;
    if (len > n)
        return 0;
    unsigned cp = c & (0x7f >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

static size_t put_utf8(char *o, unsigned cp)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xc0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char)(0xf0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* At the opening quote. The decoded text is never longer than the literal. */
static const char *parse_string(struct parser *ps, size_t *outlen)
{
    const char *start = ++ps->p;
    const char *q = start;
    while (q < ps->end && *q != '"') {
        if (*q == '\\')
            q++;
        q++;
    }
    if (q >= ps->end) {
        fail(ps, "unterminated string");
        return NULL;
    }
    char *out = arena_alloc(ps, (size_t)(q - start) + 1);
    if (!out) {
        fail(ps, "out of memory");
        return NULL;
    }
    size_t n = 0;
    const char *p = start;
    while (p < q) {
        unsigned char c = (unsigned char)*p;
        if (c < 0x20) {
            fail(ps, "control character in a string");
            return NULL;
        }
        if (c != '\\') {
            size_t l = utf8_len((const unsigned char *)p, (size_t)(q - p));
            if (l == 0) {
                fail(ps, "invalid UTF-8 in a string");
                return NULL;
            }
            memcpy(out + n, p, l);
            n += l, p += l;
            continue;
        }
        p++; /* p < q: the scan above skipped the escaped byte */
        char e = *p++;
        switch (e) {
        case '"': out[n++] = '"'; break;
        case '\\': out[n++] = '\\'; break;
        case '/': out[n++] = '/'; break;
        case 'b': out[n++] = '\b'; break;
        case 'f': out[n++] = '\f'; break;
        case 'n': out[n++] = '\n'; break;
        case 'r': out[n++] = '\r'; break;
        case 't': out[n++] = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (q - p < 4 || hex4(p, &cp) < 0) {
                fail(ps, "bad \\u escape in a string");
                return NULL;
            }
            p += 4;
            if (cp >= 0xd800 && cp <= 0xdbff) {
                if (q - p < 6 || p[0] != '\\' || p[1] != 'u' || hex4(p + 2, &lo) < 0 ||
                    lo < 0xdc00 || lo > 0xdfff) {
                    fail(ps, "unpaired surrogate in a string");
                    return NULL;
                }
                p += 6;
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            } else if (cp >= 0xdc00 && cp <= 0xdfff) {
                fail(ps, "unpaired surrogate in a string");
                return NULL;
            }
            if (cp == 0) {
                fail(ps, "NUL character in a string");
                return NULL;
            }
            /* \uXXXX is 6 bytes and yields at most 3; a pair is 12 and yields 4. */
            n += put_utf8(out + n, cp);
            break;
        }
        default:
            fail(ps, "bad escape \\%c in a string", e >= 0x20 && e < 0x7f ? e : '?');
            return NULL;
        }
    }
    out[n] = '\0';
    ps->p = q + 1;
    *outlen = n;
    return out;
}

static struct json *parse_value(struct parser *ps, int depth);

static struct json *parse_number(struct parser *ps)
{
    const char *s = ps->p, *p = s;
    if (p < ps->end && *p == '-')
        p++;
    if (p < ps->end && *p == '0')
        p++;
    else if (p < ps->end && *p >= '1' && *p <= '9')
        while (p < ps->end && *p >= '0' && *p <= '9')
            p++;
    else
        goto bad;
    if (p < ps->end && *p == '.') {
        p++;
        if (p >= ps->end || *p < '0' || *p > '9')
            goto bad;
        while (p < ps->end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < ps->end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < ps->end && (*p == '+' || *p == '-'))
            p++;
        if (p >= ps->end || *p < '0' || *p > '9')
            goto bad;
        while (p < ps->end && *p >= '0' && *p <= '9')
            p++;
    }
    struct json *n = new_node(ps, JSON_NUMBER);
    char *text = n ? arena_alloc(ps, (size_t)(p - s) + 1) : NULL;
    if (!text) {
        fail(ps, "out of memory");
        return NULL;
    }
    memcpy(text, s, (size_t)(p - s));
    text[p - s] = '\0';
    n->str = text;
    n->len = (size_t)(p - s);
    ps->p = p;
    return n;
bad:
    fail(ps, "invalid number");
    return NULL;
}

static bool literal(struct parser *ps, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(ps->end - ps->p) >= n && memcmp(ps->p, word, n) == 0) {
        ps->p += n;
        return true;
    }
    return false;
}

static struct json *parse_container(struct parser *ps, int depth, bool object)
{
    struct json *c = new_node(ps, object ? JSON_OBJECT : JSON_ARRAY);
    if (!c)
        return NULL;
    char close = object ? '}' : ']';
    ps->p++;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == close) {
        ps->p++;
        return c;
    }
    struct json **tail = &c->child;
    for (;;) {
        const char *key = NULL;
        size_t keylen;
        skip_ws(ps);
        if (object) {
            if (ps->p >= ps->end || *ps->p != '"') {
                fail(ps, "expected a string key in an object");
                return NULL;
            }
            if (!(key = parse_string(ps, &keylen)))
                return NULL;
            skip_ws(ps);
            if (ps->p >= ps->end || *ps->p != ':') {
                fail(ps, "expected ':' after a key");
                return NULL;
            }
            ps->p++;
            for (struct json *m = c->child; m; m = m->next)
                if (strcmp(m->key, key) == 0) {
                    fail(ps, "duplicate key '%.64s' in an object", key);
                    return NULL;
                }
        }
        struct json *v = parse_value(ps, depth + 1);
        if (!v)
            return NULL;
        v->key = key;
        *tail = v;
        tail = &v->next;
        c->len++;
        skip_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            continue;
        }
        if (ps->p < ps->end && *ps->p == close) {
            ps->p++;
            return c;
        }
        fail(ps, "expected ',' or '%c'", close);
        return NULL;
    }
}

static struct json *parse_value(struct parser *ps, int depth)
{
    if (depth > JSON_MAX_DEPTH) {
        fail(ps, "nesting deeper than %d levels", JSON_MAX_DEPTH);
        return NULL;
    }
    skip_ws(ps);
    if (ps->p >= ps->end) {
        fail(ps, "unexpected end of input");
        return NULL;
    }
    switch (*ps->p) {
    case '{':
        return parse_container(ps, depth, true);
    case '[':
        return parse_container(ps, depth, false);
    case '"': {
        size_t len;
        const char *s = parse_string(ps, &len);
        if (!s)
            return NULL;
        struct json *n = new_node(ps, JSON_STRING);
        if (n)
            n->str = s, n->len = len;
        return n;
    }
    case 't':
        if (literal(ps, "true"))
            return new_node(ps, JSON_TRUE);
        break;
    case 'f':
        if (literal(ps, "false"))
            return new_node(ps, JSON_FALSE);
        break;
    case 'n':
        if (literal(ps, "null"))
            return new_node(ps, JSON_NULL);
        break;
    default:
        if (*ps->p == '-' || (*ps->p >= '0' && *ps->p <= '9'))
            return parse_number(ps);
        break;
    }
    fail(ps, "invalid token");
    return NULL;
}

static void free_blocks(struct block *b)
{
    while (b) {
        struct block *n = b->next;
        free(b);
        b = n;
    }
}

int json_parse(const char *text, size_t len, struct json_doc *doc, char *err, size_t errlen)
{
    struct parser ps = { .p = text, .end = text + len, .err = err, .errlen = errlen };
    if (errlen)
        err[0] = '\0';
    struct json *root = parse_value(&ps, 1);
    if (root) {
        skip_ws(&ps);
        if (ps.p != ps.end) {
            fail(&ps, "trailing characters after the JSON value");
            root = NULL;
        }
    }
    if (!root) {
        if (!ps.failed)
            fail(&ps, "invalid JSON");
        free_blocks(ps.blocks);
        return -1;
    }
    doc->root = root;
    doc->arena = (char *)ps.blocks;
    return 0;
}

void json_free(struct json_doc *doc)
{
    if (!doc)
        return;
    free_blocks((struct block *)doc->arena);
    doc->arena = NULL;
    doc->root = NULL;
}

const struct json *json_get(const struct json *obj, const char *key)
{
    if (!obj || obj->type != JSON_OBJECT)
        return NULL;
    for (const struct json *m = obj->child; m; m = m->next)
        if (strcmp(m->key, key) == 0)
            return m;
    return NULL;
}

bool json_u64(const struct json *v, uint64_t *out)
{
    if (!v || v->type != JSON_NUMBER || v->str[0] == '-')
        return false;
    uint64_t r = 0;
    for (const char *p = v->str; *p; p++) {
        if (*p < '0' || *p > '9')
            return false; /* a fraction or an exponent */
        unsigned d = (unsigned)(*p - '0');
        if (r > (UINT64_MAX - d) / 10)
            return false;
        r = r * 10 + d;
    }
    *out = r;
    return true;
}

bool json_i64(const struct json *v, int64_t *out)
{
    if (!v || v->type != JSON_NUMBER)
        return false;
    bool neg = v->str[0] == '-';
    struct json tmp = *v;
    tmp.str = v->str + neg;
    uint64_t u;
    if (!json_u64(&tmp, &u) || u > (uint64_t)INT64_MAX + neg)
        return false;
    *out = neg ? (int64_t)(0 - u) : (int64_t)u;
    return true;
}

const char *json_type_name(enum json_type t)
{
    switch (t) {
    case JSON_NULL: return "null";
    case JSON_FALSE:
    case JSON_TRUE: return "bool";
    case JSON_NUMBER: return "number";
    case JSON_STRING: return "string";
    case JSON_ARRAY: return "array";
    case JSON_OBJECT: return "object";
    }
    return "?";
}

int json_frame_byte(struct json_frame *f, char c)
{
    if (f->in_string) {
        if (f->escape)
            f->escape = false;
        else if (c == '\\')
            f->escape = true;
        else if (c == '"') {
            f->in_string = false;
            if (f->depth == 0) {
                *f = (struct json_frame){ 0 };
                return 1;
            }
        }
        return 0;
    }
    switch (c) {
    case ' ': case '\t': case '\r': case '\n':
        if (f->scalar) {
            *f = (struct json_frame){ 0 };
            return 1;
        }
        return 0;
    case '"':
        f->in_string = true;
        f->started = true;
        return 0;
    case '{': case '[':
        f->depth++;
        f->started = true;
        return 0;
    case '}': case ']':
        if (f->depth > 0 && --f->depth == 0) {
            *f = (struct json_frame){ 0 };
            return 1;
        }
        if (f->depth == 0) { /* a stray closer: a message of its own (an error) */
            *f = (struct json_frame){ 0 };
            return 1;
        }
        return 0;
    default:
        if (f->depth == 0)
            f->scalar = true, f->started = true;
        return 0;
    }
}

/* ---- writer ---- */

void jb_init(struct json_buf *b, size_t limit)
{
    *b = (struct json_buf){ .limit = limit };
}

void jb_free(struct json_buf *b)
{
    free(b->data);
    *b = (struct json_buf){ 0 };
}

static bool jb_reserve(struct json_buf *b, size_t n)
{
    if (b->failed)
        return false;
    if (n > b->limit || b->len + n > b->limit) {
        b->failed = true;
        return false;
    }
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d) {
            b->failed = true;
            return false;
        }
        b->data = d, b->cap = cap;
    }
    return true;
}

void jb_raw(struct json_buf *b, const char *s, size_t n)
{
    if (!jb_reserve(b, n))
        return;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void jb_printf(struct json_buf *b, const char *fmt, ...)
{
    char small[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->failed = true;
        return;
    }
    if ((size_t)n < sizeof small) {
        jb_raw(b, small, (size_t)n);
        return;
    }
    if (!jb_reserve(b, (size_t)n))
        return;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void jb_str(struct json_buf *b, const char *s, size_t n)
{
    jb_raw(b, "\"", 1);
    size_t i = 0;
    while (i < n && !b->failed) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            char e[2] = { '\\', (char)c };
            jb_raw(b, e, 2);
            i++;
        } else if (c < 0x20 || c == 0x7f) {
            jb_printf(b, "\\u%04x", c);
            i++;
        } else if (c < 0x80) {
            jb_raw(b, (const char *)&s[i], 1);
            i++;
        } else {
            size_t l = utf8_len((const unsigned char *)s + i, n - i);
            if (l == 0) {
                jb_raw(b, "\\ufffd", 6);
                i++;
            } else {
                jb_raw(b, s + i, l);
                i += l;
            }
        }
    }
    jb_raw(b, "\"", 1);
}

void jb_cstr(struct json_buf *b, const char *s)
{
    jb_str(b, s, strlen(s));
}

void jb_value(struct json_buf *b, const struct json *v)
{
    switch (v->type) {
    case JSON_NULL: jb_raw(b, "null", 4); break;
    case JSON_FALSE: jb_raw(b, "false", 5); break;
    case JSON_TRUE: jb_raw(b, "true", 4); break;
    case JSON_NUMBER: jb_raw(b, v->str, v->len); break;
    case JSON_STRING: jb_str(b, v->str, v->len); break;
    case JSON_ARRAY:
    case JSON_OBJECT: {
        bool obj = v->type == JSON_OBJECT;
        jb_raw(b, obj ? "{" : "[", 1);
        for (const struct json *c = v->child; c; c = c->next) {
            if (c != v->child)
                jb_raw(b, ", ", 2);
            if (obj) {
                jb_cstr(b, c->key);
                jb_raw(b, ": ", 2);
            }
            jb_value(b, c);
        }
        jb_raw(b, obj ? "}" : "]", 1);
        break;
    }
    }
}
