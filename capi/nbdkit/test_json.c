/*
 * The control socket's JSON reader/writer (json.c) against good, bad and random input:
 *   1. QMP messages and JSON edge cases parse, and are written back as expected;
 *   2. malformed texts (truncated, bad escapes, bad UTF-8, surrogates, NUL, trailing commas,
 *      duplicate keys, nesting past JSON_MAX_DEPTH, 100000 '[') fail with a message;
 *   3. 200000 random mutations of valid messages and random byte strings: each parses or fails,
 *      never crashes nor reads out of bounds (run under ASan/UBSan and valgrind by
 *      scripts/test-c.sh), and what parses is written back as JSON that parses again;
 *   4. the stream framer splits concatenated messages at the right bytes.
 * Deterministic (fixed seed). Exit 0 on success.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

static int failures;

#define CHECK(cond, ...)                                                    \
    do {                                                                    \
        if (!(cond)) {                                                      \
            fprintf(stderr, "test_json: FAILED at line %d: ", __LINE__);   \
            fprintf(stderr, __VA_ARGS__);                                   \
            fputc('\n', stderr);                                            \
            failures++;                                                     \
        }                                                                   \
    } while (0)

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* Parse text; on success write it back into out (compact). */
static int roundtrip(const char *text, size_t len, char *out, size_t outlen)
{
    struct json_doc doc;
    char err[128];
    if (json_parse(text, len, &doc, err, sizeof err) < 0) {
        if (err[0] == '\0')
            return -2; /* a failure must say why */
        return -1;
    }
    struct json_buf b;
    jb_init(&b, 1 << 20);
    jb_value(&b, doc.root);
    int r = 0;
    if (b.failed || b.len + 1 > outlen)
        r = -3;
    else
        memcpy(out, b.data, b.len + 1);
    jb_free(&b);
    json_free(&doc);
    return r;
}

static const char *const good[][2] = {
    { "{\"execute\": \"qmp_capabilities\"}", "{\"execute\": \"qmp_capabilities\"}" },
    { " {\"execute\":\"query-jobs\",\"id\":\"__qmp#00001\"} ",
      "{\"execute\": \"query-jobs\", \"id\": \"__qmp#00001\"}" },
    { "{\"a\":[1,-2,3.5e+2,0,-0.25E-3,true,false,null,{},[]]}",
      "{\"a\": [1, -2, 3.5e+2, 0, -0.25E-3, true, false, null, {}, []]}" },
    { "\"\\u00e9\\ud83d\\ude00\\n\\t\\\"\\\\\\/\"", "\"\xc3\xa9\xf0\x9f\x98\x80\\u000a\\u0009\\\"\\\\/\"" },
    { "\"caf\xc3\xa9\"", "\"caf\xc3\xa9\"" },
    { "123", "123" },
    { "[[[[[[[[[[]]]]]]]]]]", "[[[[[[[[[[]]]]]]]]]]" },
};

static const char *const bad[] = {
    "", " ", "{", "}", "[1,]", "{\"a\":1,}", "{\"a\" 1}", "{a:1}", "{'a':1}", "[1 2]",
    "\"abc", "\"\\x\"", "\"\\u12\"", "\"\\ud800\"", "\"\\udc00\"", "\"\\ud800\\u0041\"",
    "\"\\u0000\"", "\"a\x01b\"", "\"\xc3\x28\"", "\"\xe0\x80\x80\"", "\"\xed\xa0\x80\"",
    "\"\xf5\x80\x80\x80\"", "\"\xc3\"", "01", "-", "1.", "1e", ".5", "+1", "tru", "nul",
    "{\"a\":1}{", "{\"a\":1,\"a\":2}", "[1]x", "NaN", "Infinity", "\"\x7f\xff\"",
};

int main(void)
{
    char out[1 << 16];

    /* 1. good input */
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        int r = roundtrip(good[i][0], strlen(good[i][0]), out, sizeof out);
        CHECK(r == 0, "good[%zu] %s: %d", i, good[i][0], r);
        if (r == 0)
            CHECK(strcmp(out, good[i][1]) == 0, "good[%zu]: %s, wanted %s", i, out, good[i][1]);
    }
    {
        struct json_doc doc;
        char err[128];
        const char *m = "{\"execute\":\"x\",\"arguments\":{\"speed\":18446744073709551615,"
                        "\"neg\":-9223372036854775808,\"big\":18446744073709551616,\"f\":1.5}}";
        CHECK(json_parse(m, strlen(m), &doc, err, sizeof err) == 0, "%s", err);
        const struct json *a = json_get(doc.root, "arguments");
        uint64_t u;
        int64_t s;
        CHECK(json_u64(json_get(a, "speed"), &u) && u == UINT64_MAX, "u64 max");
        CHECK(!json_u64(json_get(a, "big"), &u), "u64 overflow accepted");
        CHECK(!json_u64(json_get(a, "f"), &u), "a fraction accepted as an integer");
        CHECK(!json_u64(json_get(a, "neg"), &u), "a negative accepted as u64");
        CHECK(json_i64(json_get(a, "neg"), &s) && s == INT64_MIN, "i64 min");
        CHECK(json_get(a, "nope") == NULL && json_get(json_get(a, "speed"), "x") == NULL,
              "json_get on a missing key / a non-object");
        json_free(&doc);
    }

    /* 2. bad input */
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int r = roundtrip(bad[i], strlen(bad[i]), out, sizeof out);
        CHECK(r == -1, "bad[%zu] \"%s\": %d (wanted a parse error with a message)", i, bad[i], r);
    }
    {
        /* nesting: JSON_MAX_DEPTH levels parse, one more does not; 100000 do not either */
        static char deep[200002];
        for (int d = JSON_MAX_DEPTH; d <= JSON_MAX_DEPTH + 1; d++) {
            memset(deep, '[', (size_t)d);
            memset(deep + d, ']', (size_t)d);
            int r = roundtrip(deep, 2 * (size_t)d, out, sizeof out);
            CHECK(d == JSON_MAX_DEPTH ? r == 0 : r == -1, "depth %d: %d", d, r);
        }
        memset(deep, '[', 100000);
        memset(deep + 100000, ']', 100000);
        CHECK(roundtrip(deep, 200000, out, sizeof out) == -1, "100000 levels");
        /* an embedded NUL byte ends nothing: it is a bad character */
        CHECK(roundtrip("\"a\0b\"", 5, out, sizeof out) == -1, "raw NUL in a string");
    }
    {
        /* the writer: invalid UTF-8 and control characters are escaped, the limit holds */
        struct json_buf b;
        jb_init(&b, 64);
        jb_str(&b, "a\xff\x01\"", 4);
        CHECK(!b.failed && strcmp(b.data, "\"a\\ufffd\\u0001\\\"\"") == 0, "jb_str: %s", b.data);
        for (int i = 0; i < 100; i++)
            jb_cstr(&b, "0123456789");
        CHECK(b.failed && b.len <= 64, "jb limit: failed %d len %zu", b.failed, b.len);
        jb_free(&b);
    }

    /* 3. random mutations and random bytes */
    const char *seeds[] = {
        "{\"execute\": \"blockdev-backup\", \"arguments\": {\"device\": \"d\", \"target\": "
        "\"/b/full.raw\", \"sync\": \"full\", \"speed\": 1048576, \"bitmap\": \"b0\"}, "
        "\"id\": [1, {\"x\": null}]}",
        "{\"execute\": \"nbd-server-start\", \"arguments\": {\"addr\": {\"type\": \"unix\", "
        "\"data\": {\"path\": \"/tmp/s\\u00e9\"}}}}",
        "[\"\\ud83d\\ude00\", -1.5e-7, true, false, null, {\"a\": {\"b\": [[], {}]}}]",
    };
    char buf[1024];
    long parsed = 0, refused = 0;
    for (int iter = 0; iter < 200000; iter++) {
        size_t len;
        if (iter % 10 == 9) {
            len = next_rand() % 300;
            for (size_t k = 0; k < len; k++)
                buf[k] = (char)(next_rand() & 0xff);
        } else {
            const char *s = seeds[next_rand() % 3];
            len = strlen(s);
            memcpy(buf, s, len);
            int edits = 1 + (int)(next_rand() % 4);
            for (int e = 0; e < edits && len > 0; e++) {
                size_t pos = next_rand() % len;
                switch (next_rand() % 4) {
                case 0: buf[pos] = (char)(next_rand() & 0xff); break;
                case 1: len = pos; break;                                 /* truncate */
                case 2: memmove(buf + pos, buf + pos + 1, len - pos - 1); len--; break;
                default:
                    if (len < sizeof buf - 1) {
                        memmove(buf + pos + 1, buf + pos, len - pos);
                        buf[pos] = "{}[]\",:\\ ue0-"[next_rand() % 14];
                        len++;
                    }
                }
            }
        }
        /* An exact-size heap copy: ASan sees any read past the end. */
        char *copy = malloc(len ? len : 1);
        memcpy(copy, buf, len);
        int r = roundtrip(copy, len, out, sizeof out);
        free(copy);
        CHECK(r == 0 || r == -1, "iteration %d: %d", iter, r);
        if (r == 0) {
            parsed++;
            char again[sizeof out];
            CHECK(roundtrip(out, strlen(out), again, sizeof again) == 0 &&
                  strcmp(out, again) == 0, "iteration %d: written-back JSON does not parse "
                  "to itself: %s", iter, out);
        } else {
            refused++;
        }
    }
    CHECK(parsed > 1000 && refused > 1000, "mutations: %ld parsed, %ld refused", parsed, refused);

    /* 4. framing */
    {
        const char *stream = "{\"a\": \"}\\\"{\"} [1, [2]]\r\n\"x\\\"y\" 12 {}";
        const char *want[] = { "{\"a\": \"}\\\"{\"}", "[1, [2]]", "\"x\\\"y\"", "12", "{}" };
        struct json_frame f = { 0 };
        size_t start = 0, n = 0;
        for (size_t i = 0; stream[i] && n < 5; i++) {
            if (!f.started && f.depth == 0 && (stream[i] == ' ' || stream[i] == '\r' ||
                                               stream[i] == '\n')) {
                start = i + 1;
                continue;
            }
            if (json_frame_byte(&f, stream[i])) {
                size_t l = i + 1 - start;
                if (stream[i] == ' ') /* a scalar ends at the space after it */
                    l--;
                CHECK(l == strlen(want[n]) && memcmp(stream + start, want[n], l) == 0,
                      "frame %zu: %.*s", n, (int)l, stream + start);
                n++;
                start = i + 1;
            }
        }
        CHECK(n == 5, "frames: %zu, wanted 5", n);
    }

    if (failures) {
        fprintf(stderr, "test_json: %d failures\n", failures);
        return 1;
    }
    printf("test_json: all passed (%ld random inputs parsed, %ld refused)\n", parsed, refused);
    return 0;
}
