/*
 * flowray.ingest._native: the NDJSON and JSON-array ingest parser in C.
 *
 * A batch of tracker events (flat JSON objects, one a line or in an array) becomes
 * the columns of an Arrow table in one pass over the body, with the GIL released. Like every fast
 * path in flowray.ingest.fastparse it is strict: it accepts the usual form exactly and
 * answers None at the first doubt — a nested value, a repeated or missing field, a
 * number where a string belongs, a bad escape, a time out of range or in an unusual
 * spelling —
 * and the Python parsers then judge the body and name every bad item. It never
 * accepts what they would reject, and gives the same table for what it accepts
 * (tests/test_native.py checks both, differentially).
 *
 * Arrow's JSON reader took about 0.5 ms for 1,000 events on the 2-core reference
 * machine, the checks after it 0.2 ms more; this does both in a tenth of that.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

/* The columns, the field names, and the limits: generated from flowray/ingest/rules.py,
 * which the Python parsers read too. */
#include "_rules.h"

typedef struct {
    char *data;        /* the values' bytes, back to back */
    size_t used;
    int32_t *offsets;  /* n + 1 */
    uint8_t *valid;    /* a bit per row, least significant first */
    Py_ssize_t nulls;
} Column;

typedef struct {
    int64_t ts;
    int has_ts;
    const char *value[NCOLS]; /* NULL: absent or null */
    size_t length[NCOLS];
    int escaped[NCOLS]; /* the value has escapes: decoded when it is copied */
} Line;

typedef struct {
    int64_t ts_lo, ts_hi, now_ms;
    Py_ssize_t chars_max[NCOLS];
} Rules;

/* JSON's whitespace ("\n" never occurs inside an NDJSON line: lines are cut first). */
static int is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

static const char *skip_space(const char *p, const char *end) {
    while (p < end && is_space(*p)) p++;
    return p;
}

/* Four hex digits at p (p + 4 <= end checked by the caller) as a number, or -1. */
static long hex4(const char *p) {
    long v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        int d = c >= '0' && c <= '9' ? c - '0'
              : c >= 'a' && c <= 'f' ? c - 'a' + 10
              : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                     : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

/* The code point of the \u escape at p (at its backslash), and in *size its length:
 * 6 bytes, or 12 for a surrogate pair. -1 for a bad escape, a lone surrogate (orjson
 * refuses both) or U+0000 (a doubt). */
static long unicode_escape(const char *p, const char *end, size_t *size) {
    long cp, low;
    if (end - p < 6 || (cp = hex4(p + 2)) <= 0 || (cp >= 0xDC00 && cp <= 0xDFFF)) return -1;
    *size = 6;
    if (cp < 0xD800 || cp > 0xDBFF) return cp;
    if (end - p < 12 || p[6] != '\\' || p[7] != 'u') return -1;
    low = hex4(p + 8);
    if (low < 0xDC00 || low > 0xDFFF) return -1;
    *size = 12;
    return 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
}

/* The length of the well-formed UTF-8 sequence at p, whose first byte is 0x80 or
 * more, or 0 if it is not one: the sequences of the Unicode standard's table 3-7,
 * which Python's strict decoder takes too (no overlong forms, no surrogates, nothing
 * past U+10FFFF). */
static size_t utf8_sequence(const unsigned char *p, const unsigned char *end) {
    unsigned char c = p[0], lo = 0x80, hi = 0xBF;
    size_t n;
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0) lo = 0xA0;      /* overlong below */
        else if (c == 0xED) hi = 0x9F; /* surrogates above */
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0) lo = 0x90;      /* overlong below */
        else if (c == 0xF4) hi = 0x8F; /* past U+10FFFF above */
    } else {
        return 0; /* a continuation byte first, an overlong 0xC0/0xC1, or 0xF5 and up */
    }
    if ((size_t)(end - p) < n || p[1] < lo || p[1] > hi) return 0;
    for (size_t i = 2; i < n; i++)
        if ((p[i] & 0xC0) != 0x80) return 0;
    return n;
}

/* Whether any of a word's 8 bytes ends or escapes a plain string run: below 0x20,
 * 0x80 or above (UTF-8, checked byte by byte), '"' or '\\'. Exact for "any"; which
 * byte it was is left to the byte-by-byte loop. */
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL
static inline int plain_word_ends(uint64_t w) {
    uint64_t quote = w ^ (ONES * '"'), slash = w ^ (ONES * '\\');
    uint64_t low = (w - ONES * 0x20) & ~w;
    uint64_t zero_quote = (quote - ONES) & ~quote, zero_slash = (slash - ONES) & ~slash;
    return ((w | low | zero_quote | zero_slash) & HIGHS) != 0;
}

/* A string's bytes (after the opening quote) up to its closing quote, or NULL for a
 * bad escape, a control character, bytes that are not UTF-8 or no closing quote on
 * the line. Counts its characters as they decode (a UTF-8 sequence or an escape is
 * one), and sets *escaped if it has escapes. Strings are the only place where a byte
 * of 0x80 or more is taken, so a body the parser accepts is UTF-8 throughout. */
static const char *scan_string(const char *p, const char *end, size_t *chars, int *escaped) {
    size_t n = 0, size;
    int words = 1;
    *escaped = 0;
    while (p < end) {
        /* Plain ASCII a word at a time: paths, referrers and User-Agents are long runs
         * of it, and byte by byte this loop was a quarter of parsing such events. Once
         * a word holds a byte that ends the run, bytes go one by one up to it (words
         * again only after an escape or a UTF-8 sequence): short keys cost one test. */
        while (words && end - p >= 8) {
            uint64_t w;
            memcpy(&w, p, 8);
            if (plain_word_ends(w)) {
                words = 0;
                break;
            }
            p += 8;
            n += 8;
        }
        if (p >= end) break;
        unsigned char c = (unsigned char)*p;
        if (c == '"') {
            *chars = n;
            return p;
        }
        if (c < 0x20) return NULL;
        if (c == '\\') {
            *escaped = 1;
            if (p + 1 >= end) return NULL;
            if (p[1] == 'u') {
                if (unicode_escape(p, end, &size) < 0) return NULL;
                p += size;
            } else if (strchr("\"\\/bfnrt", p[1]) != NULL && p[1] != '\0') {
                p += 2;
            } else {
                return NULL;
            }
            n++;
            words = 1;
            continue;
        }
        if (c >= 0x80) {
            size = utf8_sequence((const unsigned char *)p, (const unsigned char *)end);
            if (size == 0) return NULL;
            p += size;
            words = 1;
        } else {
            p++;
        }
        n++;
    }
    return NULL;
}

/* Decode a scanned string's n bytes at src (escapes valid: scan_string checked them)
 * into dst as UTF-8; returns the bytes written, never more than n. */
static size_t unescape(char *dst, const char *src, size_t n) {
    const char *end = src + n;
    char *out = dst;
    size_t size;
    while (src < end) {
        if (*src != '\\') {
            *out++ = *src++;
            continue;
        }
        char e = src[1];
        if (e == 'u') {
            long cp = unicode_escape(src, end, &size);
            src += size;
            if (cp < 0x80) {
                *out++ = (char)cp;
            } else if (cp < 0x800) {
                *out++ = (char)(0xC0 | (cp >> 6));
                *out++ = (char)(0x80 | (cp & 0x3F));
            } else if (cp < 0x10000) {
                *out++ = (char)(0xE0 | (cp >> 12));
                *out++ = (char)(0x80 | ((cp >> 6) & 0x3F));
                *out++ = (char)(0x80 | (cp & 0x3F));
            } else {
                *out++ = (char)(0xF0 | (cp >> 18));
                *out++ = (char)(0x80 | ((cp >> 12) & 0x3F));
                *out++ = (char)(0x80 | ((cp >> 6) & 0x3F));
                *out++ = (char)(0x80 | (cp & 0x3F));
            }
            continue;
        }
        *out++ = e == 'b' ? '\b' : e == 'f' ? '\f' : e == 'n' ? '\n' : e == 'r' ? '\r'
               : e == 't' ? '\t' : e; /* \" \\ \/ stand for themselves */
        src += 2;
    }
    return (size_t)(out - dst);
}

/* A JSON number. *integer is set when it has no fraction or exponent and fits in 18
 * digits, its value then in *value; *safe when every JSON reader takes it (orjson
 * refuses a number that overflows a double, so an exponent or more than 300 integer
 * digits is a doubt). Returns the first byte after it, or NULL. */
static const char *scan_number(const char *p, const char *end, int *integer, int *safe,
                               int64_t *value) {
    int negative = 0, digits = 0;
    int64_t v = 0;
    if (p < end && *p == '-') {
        negative = 1;
        p++;
    }
    if (p >= end || *p < '0' || *p > '9') return NULL;
    if (*p == '0') {
        p++;
        digits = 1;
    } else {
        while (p < end && *p >= '0' && *p <= '9') {
            if (digits < 18) v = v * 10 + (*p - '0');
            digits++;
            p++;
        }
    }
    *integer = digits <= 18;
    *safe = digits <= 300;
    if (p < end && *p == '.') {
        *integer = 0;
        p++;
        if (p >= end || *p < '0' || *p > '9') return NULL;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        *integer = *safe = 0;
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (p >= end || *p < '0' || *p > '9') return NULL;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    *value = negative ? -v : v;
    return p;
}

static const char *scan_literal(const char *p, const char *end, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(end - p) < n || memcmp(p, word, n) != 0) return NULL;
    return p + n;
}

/* Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm). */
static int64_t days_from_civil(int64_t y, int64_t m, int64_t d) {
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* n ASCII digits at p as a number, or -1. */
static int64_t digits(const char *p, size_t n) {
    int64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return -1;
        v = v * 10 + (p[i] - '0');
    }
    return v;
}

/* A quoted time, as the exact parser reads it (events.parse_timestamp): ASCII digits
 * are epoch milliseconds; else the usual RFC 3339 form, exactly
 * YYYY-MM-DDTHH:MM:SS[.f{1,9}](Z|+HH:MM|-HH:MM), which datetime.fromisoformat reads
 * the same way (fraction truncated to microseconds, then to milliseconds). Anything
 * else it accepts (lower case, a space, basic format, offsets with seconds...) is a
 * doubt. 1 and the epoch milliseconds in *ms, or 0. */
static int string_time(const char *p, size_t n, int64_t *ms) {
    static const int month_days[12] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int64_t y, mo, d, h, mi, s, frac = 0, offset = 0;
    size_t i = 19, f = 0;
    if (n >= 1 && n <= 18 && digits(p, n) >= 0) {
        *ms = digits(p, n);
        return 1;
    }
    if (n < 20 || p[4] != '-' || p[7] != '-' || p[10] != 'T' || p[13] != ':' || p[16] != ':')
        return 0;
    y = digits(p, 4), mo = digits(p + 5, 2), d = digits(p + 8, 2);
    h = digits(p + 11, 2), mi = digits(p + 14, 2), s = digits(p + 17, 2);
    if (y < 1 || mo < 1 || mo > 12 || d < 1 || h < 0 || h > 23 || mi < 0 || mi > 59 || s < 0 ||
        s > 59)
        return 0;
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (d > month_days[mo - 1] + (mo == 2 && leap)) return 0;
    if (p[i] == '.') {
        for (i++; i < n && p[i] >= '0' && p[i] <= '9'; i++, f++)
            if (f < 3) frac = frac * 10 + (p[i] - '0');
        if (f < 1 || f > 9) return 0;
        for (; f < 3; f++) frac *= 10;
    }
    if (i + 1 == n && p[i] == 'Z') {
        offset = 0;
    } else if (i + 6 == n && (p[i] == '+' || p[i] == '-') && p[i + 3] == ':') {
        int64_t oh = digits(p + i + 1, 2), om = digits(p + i + 4, 2);
        if (oh < 0 || oh > 23 || om < 0 || om > 59) return 0;
        offset = (p[i] == '+' ? 1 : -1) * (oh * 60 + om) * 60000;
    } else {
        return 0;
    }
    *ms = days_from_civil(y, mo, d) * 86400000 + ((h * 60 + mi) * 60 + s) * 1000 + frac - offset;
    return 1;
}

/* One event object at p (after any whitespace): the byte after its "}" with the event
 * in *line, or NULL on any doubt. */
static const char *parse_object(const char *p, const char *end, const Rules *rules,
                                Line *line) {
    unsigned seen = 0;
    memset(line, 0, sizeof(*line));
    p = skip_space(p, end);
    if (p >= end || *p != '{') return NULL;
    p = skip_space(p + 1, end);
    if (p < end && *p == '}') return NULL; /* {}: no site */
    for (;;) {
        size_t chars;
        const char *key, *key_end;
        int field, integer, safe, escaped;
        int64_t number;
        if (p >= end || *p != '"') return NULL;
        key = p + 1;
        key_end = scan_string(key, end, &chars, &escaped);
        if (key_end == NULL || escaped) return NULL; /* an escaped key: a doubt */
        field = field_of(key, (size_t)(key_end - key));
        if (field >= 0) {
            if (seen & (1u << field)) return NULL; /* a repeated field */
            seen |= 1u << field;
        }
        p = skip_space(key_end + 1, end);
        if (p >= end || *p != ':') return NULL;
        p = skip_space(p + 1, end);
        if (p >= end) return NULL;
        if (*p == '"') {
            const char *value = p + 1, *value_end = scan_string(value, end, &chars, &escaped);
            if (value_end == NULL) return NULL;
            if (escaped && (field == FIELD_TS || field == COL_SITE)) return NULL; /* rare */
            if (field == FIELD_TS) {
                if (!string_time(value, (size_t)(value_end - value), &number)) return NULL;
                if (number < rules->ts_lo || number > rules->ts_hi) return NULL;
                line->ts = number;
                line->has_ts = 1;
            } else if (field >= 0) { /* a string column: field < NCOLS */
                if ((Py_ssize_t)chars > rules->chars_max[field]) return NULL;
                if (!(RULE_EMPTY_IS_NULL(field) && value_end == value)) { /* "": null */
                    line->value[field] = value;
                    line->length[field] = (size_t)(value_end - value);
                    line->escaped[field] = escaped;
                }
            }
            p = value_end + 1;
        } else if (*p == 'n') {
            if ((p = scan_literal(p, end, "null")) == NULL) return NULL;
            if (field == COL_SITE) return NULL;
        } else if (*p == '-' || (*p >= '0' && *p <= '9')) {
            if ((p = scan_number(p, end, &integer, &safe, &number)) == NULL) return NULL;
            if (!safe) return NULL;
            if (field == FIELD_TS) {
                if (!integer || number < rules->ts_lo || number > rules->ts_hi) return NULL;
                line->ts = number;
                line->has_ts = 1;
            } else if (field >= 0) {
                return NULL; /* a number where a string belongs */
            }
        } else if (*p == 't' || *p == 'f') {
            if ((p = scan_literal(p, end, *p == 't' ? "true" : "false")) == NULL) return NULL;
            if (field >= 0) return NULL;
        } else {
            return NULL; /* an object or array: not the flat form */
        }
        p = skip_space(p, end);
        if (p < end && *p == ',') {
            p = skip_space(p + 1, end);
            continue;
        }
        if (p < end && *p == '}') break;
        return NULL;
    }
    if (line->value[COL_SITE] == NULL) return NULL;
    if (!line->has_ts) { /* the time of receipt, which must be in range too */
        if (rules->now_ms < rules->ts_lo || rules->now_ms > rules->ts_hi) return NULL;
        line->ts = rules->now_ms;
    }
    return p + 1;
}

/* One NDJSON line holding one event object: 1 and the event in *line, or 0. */
static int parse_line(const char *p, const char *end, const Rules *rules, Line *line) {
    p = parse_object(p, end, rules, line);
    return p != NULL && skip_space(p, end) == end; /* nothing after the object */
}

/* Whether flowray.core.router.normalize_site returns this site unchanged: 1 to
 * RULE_SITE_BYTES_MAX bytes of [a-z0-9.-] in labels of 1 to RULE_SITE_LABEL_BYTES_MAX
 * bytes that neither begin nor end with "-" (so no upper case, spaces, trailing dot or
 * IDNA to fold). Anything else is left to it. */
static int site_is_normal(const char *p, size_t n) {
    size_t label = 0;
    if (n == 0 || n > RULE_SITE_BYTES_MAX) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (c == '.') {
            if (label == 0 || p[i - 1] == '-') return 0;
            label = 0;
        } else if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-') {
            if (++label > RULE_SITE_LABEL_BYTES_MAX || (label == 1 && c == '-')) return 0;
        } else {
            return 0;
        }
    }
    return label > 0 && p[n - 1] != '-';
}

static int blank(const char *p, const char *end) { return skip_space(p, end) == end; }

static void free_columns(Column *columns) {
    for (int c = 0; c < NCOLS; c++) {
        free(columns[c].data);
        free(columns[c].offsets);
        free(columns[c].valid);
    }
}

typedef struct {
    int64_t *ts;
    Column columns[NCOLS];
    Py_ssize_t n, rows_max;
    int sites_normal;
} Out;

/* Append one parsed event; 0 when events_max are there already (rows_max is the
 * smaller of events_max and what the body can hold: the buffers' size). */
static int add_event(Out *out, const Line *line) {
    Py_ssize_t n = out->n;
    if (n >= out->rows_max) return 0;
    out->ts[n] = line->ts;
    if (out->sites_normal)
        out->sites_normal = site_is_normal(line->value[COL_SITE], line->length[COL_SITE]);
    for (int c = 0; c < NCOLS; c++) {
        Column *col = &out->columns[c];
        if (line->value[c] != NULL && line->escaped[c]) {
            col->used += unescape(col->data + col->used, line->value[c], line->length[c]);
            col->valid[n >> 3] |= (uint8_t)(1u << (n & 7));
        } else if (line->value[c] != NULL) {
            memcpy(col->data + col->used, line->value[c], line->length[c]);
            col->used += line->length[c];
            col->valid[n >> 3] |= (uint8_t)(1u << (n & 7));
        } else {
            col->nulls++;
        }
        col->offsets[n + 1] = (int32_t)col->used;
    }
    out->n = n + 1;
    return 1;
}

/* An NDJSON body: 1, or 0 on doubt. Blank lines are skipped, as the exact parser does.
 * Runs without the GIL: it touches no Python object. */
static int parse_ndjson(const char *body, size_t size, const Rules *rules, Out *out) {
    const char *p = body, *end = body + size;
    Line line;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (eol == NULL) eol = end;
        if (!blank(p, eol)) {
            if (!parse_line(p, eol, rules, &line) || !add_event(out, &line)) return 0;
        }
        if (eol == end) break;
        p = eol + 1;
    }
    return 1;
}

/* A JSON body: an array of event objects, or one object. 1, or 0 on doubt. */
static int parse_json(const char *body, size_t size, const Rules *rules, Out *out) {
    const char *p = skip_space(body, body + size), *end = body + size;
    Line line;
    if (p < end && *p == '{') {
        p = parse_object(p, end, rules, &line);
        return p != NULL && skip_space(p, end) == end && add_event(out, &line);
    }
    if (p >= end || *p != '[') return 0;
    for (;;) {
        p = parse_object(p + 1, end, rules, &line); /* also refuses "[]": an empty batch */
        if (p == NULL || !add_event(out, &line)) return 0;
        p = skip_space(p, end);
        if (p < end && *p == ',') continue;
        if (p < end && *p == ']') break;
        return 0;
    }
    return skip_space(p + 1, end) == end;
}

/*
 * Routing: the rows of a table in (rank, hour) order, where a row's rank is that of
 * its site's shard (ranks order shards by owning group, see flowray.ingest.pieces). Each
 * row's site is found in a cache of (shard count, site) -> shard kept here across
 * calls (sites repeat across requests; Python hashes the ones it has not seen, with
 * BLAKE2b, and adds them with learn()); a counting sort over the distinct keys then
 * gives a stable order. The numpy path it replaces (a dictionary encoding, a list of
 * the sites, a map over a dict, an argsort) took 250 µs for 1,000 events on the
 * 2-core reference machine on a slow day. Every call holds the GIL throughout and
 * calls no Python code while it changes the cache, so threads may share it.
 */
#define SHARDS_MAX (1 << 22) /* a rank takes the 22 bits above the hour's 40 */

typedef struct {
    char *site; /* owned; NULL: an empty slot */
    Py_ssize_t size;
    uint64_t hash;
    Py_ssize_t shard_count;
    int64_t shard;
} CacheSlot;

static CacheSlot *cache_slots;
static Py_ssize_t cache_size, cache_used; /* size: a power of two, or 0 */
static uint64_t hash_seed;                /* random per process: no chosen collisions */

typedef struct {
    int64_t key;
    Py_ssize_t count, next; /* rows of the key; where its next row goes in the order */
    int used;
} KeySlot;

static uint64_t mix64(uint64_t x) { /* splitmix64's finalizer */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t site_hash(const char *p, Py_ssize_t n, Py_ssize_t shard_count) {
    uint64_t h = hash_seed ^ mix64((uint64_t)n * 0x9E3779B97F4A7C15ULL ^ (uint64_t)shard_count);
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = ((h << 23 | h >> 41) ^ w) * 0x9E3779B97F4A7C15ULL;
    }
    if (n > 0) {
        uint64_t w = 0;
        memcpy(&w, p, (size_t)n);
        h = ((h << 23 | h >> 41) ^ w) * 0x9E3779B97F4A7C15ULL;
    }
    return mix64(h);
}

/* The slot of (shard_count, site): its own, or the empty one where it would go. */
static CacheSlot *cache_find(const char *site, Py_ssize_t size, Py_ssize_t shard_count,
                             uint64_t hash) {
    Py_ssize_t mask = cache_size - 1, at = (Py_ssize_t)(hash & (uint64_t)mask);
    while (cache_slots[at].site != NULL &&
           !(cache_slots[at].hash == hash && cache_slots[at].size == size &&
             cache_slots[at].shard_count == shard_count &&
             memcmp(cache_slots[at].site, site, (size_t)size) == 0))
        at = (at + 1) & mask;
    return &cache_slots[at];
}

static void cache_clear(void) {
    for (Py_ssize_t i = 0; i < cache_size; i++) free(cache_slots[i].site);
    free(cache_slots);
    cache_slots = NULL;
    cache_size = cache_used = 0;
}

/* Room for one more entry at a load of at most a half; 0 when out of memory. */
static int cache_reserve(void) {
    if (2 * (cache_used + 1) <= cache_size) return 1;
    Py_ssize_t size = cache_size ? 2 * cache_size : 1024;
    CacheSlot *old = cache_slots, *slots = calloc((size_t)size, sizeof(CacheSlot));
    if (slots == NULL) return 0;
    Py_ssize_t old_size = cache_size;
    cache_slots = slots;
    cache_size = size;
    for (Py_ssize_t i = 0; i < old_size; i++)
        if (old[i].site != NULL)
            *cache_find(old[i].site, old[i].size, old[i].shard_count, old[i].hash) = old[i];
    free(old);
    return 1;
}

PyDoc_STRVAR(learn_doc,
"learn(shard_count, sites, shards, capacity)\n"
"--\n\n"
"Remember the shard of each site (bytes) for group(); a cache that would hold more\n"
"than capacity sites is emptied first. Returns the number of sites it holds.");

static PyObject *learn(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t shard_count, capacity;
    PyObject *sites, *shards;
    if (!PyArg_ParseTuple(args, "nO!O!n", &shard_count, &PyList_Type, &sites, &PyList_Type,
                          &shards, &capacity))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(sites), fresh = 0;
    if (PyList_GET_SIZE(shards) != n || shard_count < 1 || shard_count > SHARDS_MAX ||
        capacity < n) {
        PyErr_SetString(PyExc_ValueError, "learn: sites and shards differ, or too many");
        return NULL;
    }
    int64_t *values = malloc((size_t)(n ? n : 1) * sizeof(int64_t));
    if (values == NULL) return PyErr_NoMemory();
    /* Check all first, nothing half learned. Exact ints and bytes only: reading them
     * runs no Python code, which could change the lists or the cache under this loop. */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *site = PyList_GET_ITEM(sites, i), *shard = PyList_GET_ITEM(shards, i);
        int overflow = 0;
        long long value = PyLong_CheckExact(shard) ? PyLong_AsLongLongAndOverflow(shard, &overflow) : -1;
        if (!PyBytes_CheckExact(site) || overflow || value < 0 || value >= shard_count) {
            free(values);
            PyErr_SetString(PyExc_ValueError, "learn: a site that is not bytes, or a bad shard");
            return NULL;
        }
        values[i] = value;
        const char *p = PyBytes_AS_STRING(site);
        Py_ssize_t size = PyBytes_GET_SIZE(site);
        if (cache_size == 0 || cache_find(p, size, shard_count, site_hash(p, size, shard_count))->site == NULL)
            fresh++; /* an upper bound: a site listed twice counts twice */
    }
    if (cache_used + fresh > capacity) cache_clear();
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *site = PyList_GET_ITEM(sites, i);
        const char *p = PyBytes_AS_STRING(site);
        Py_ssize_t size = PyBytes_GET_SIZE(site);
        uint64_t hash = site_hash(p, size, shard_count);
        char *copy = NULL;
        if (!cache_reserve()) goto nomemory;
        CacheSlot *slot = cache_find(p, size, shard_count, hash);
        if (slot->site != NULL) continue; /* learned already */
        copy = malloc(size ? (size_t)size : 1);
        if (copy == NULL) goto nomemory;
        memcpy(copy, p, (size_t)size);
        slot->site = copy;
        slot->size = size;
        slot->hash = hash;
        slot->shard_count = shard_count;
        slot->shard = values[i];
        cache_used++;
    }
    free(values);
    return PyLong_FromSsize_t(cache_used);
nomemory:
    free(values);
    return PyErr_NoMemory();
}

static Py_ssize_t table_size(Py_ssize_t n) {
    Py_ssize_t size = 16;
    while (size < 2 * n) size <<= 1;
    return size;
}

static int compare_keys(const void *a, const void *b) {
    int64_t x = ((const KeySlot *)a)->key, y = ((const KeySlot *)b)->key;
    return (x > y) - (x < y);
}

#define HOUR_BITS 40

/* Each row's shard from the cache (-1: not in it; those rows' sites go to missing).
 * 0 with a Python error set on failure. */
static int row_shards(const int32_t *offsets, const char *data, Py_ssize_t data_size,
                      Py_ssize_t n, Py_ssize_t shard_count, int64_t *shards,
                      PyObject *missing) {
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t lo, hi; /* read by memcpy: a buffer need not be aligned */
        memcpy(&lo, offsets + i, sizeof(lo));
        memcpy(&hi, offsets + i + 1, sizeof(hi));
        if (lo < 0 || hi < lo || hi > data_size) {
            PyErr_SetString(PyExc_ValueError, "site offsets out of range");
            return 0;
        }
        const char *site = data + lo;
        Py_ssize_t size = hi - lo;
        CacheSlot *slot = cache_size ? cache_find(site, size, shard_count,
                                                  site_hash(site, size, shard_count))
                                     : NULL;
        if (slot != NULL && slot->site != NULL) {
            shards[i] = slot->shard;
            continue;
        }
        shards[i] = -1;
        PyObject *key = PyBytes_FromStringAndSize(site, size);
        if (key == NULL || PyList_Append(missing, key) < 0) {
            Py_XDECREF(key);
            return 0;
        }
        Py_DECREF(key);
    }
    return 1;
}

/* The distinct keys in order, each with its first row's place in the order; returns
 * their count, or -1 with a Python error set. */
static Py_ssize_t sort_keys(const int64_t *keys, Py_ssize_t n, int64_t *order, KeySlot **sorted) {
    Py_ssize_t size = table_size(n), mask = size - 1, distinct = 0;
    KeySlot *slots = calloc((size_t)size, sizeof(KeySlot));
    Py_ssize_t *slot_of = malloc((size_t)(n ? n : 1) * sizeof(Py_ssize_t));
    KeySlot *list = NULL;
    if (slots == NULL || slot_of == NULL) goto nomemory;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t at = (Py_ssize_t)(mix64((uint64_t)keys[i]) & (uint64_t)mask);
        while (slots[at].used && slots[at].key != keys[i]) at = (at + 1) & mask;
        if (!slots[at].used) {
            slots[at].used = 1;
            slots[at].key = keys[i];
            distinct++;
        }
        slots[at].count++;
        slot_of[i] = at;
    }
    list = malloc((size_t)(distinct ? distinct : 1) * sizeof(KeySlot));
    if (list == NULL) goto nomemory;
    for (Py_ssize_t at = 0, k = 0; at < size; at++)
        if (slots[at].used) list[k++] = slots[at];
    qsort(list, (size_t)distinct, sizeof(KeySlot), compare_keys);
    Py_ssize_t start = 0;
    for (Py_ssize_t k = 0; k < distinct; k++) { /* where each key's rows begin */
        Py_ssize_t at = (Py_ssize_t)(mix64((uint64_t)list[k].key) & (uint64_t)mask);
        while (slots[at].key != list[k].key) at = (at + 1) & mask;
        slots[at].next = list[k].next = start;
        start += list[k].count;
    }
    for (Py_ssize_t i = 0; i < n; i++) order[slots[slot_of[i]].next++] = i;
    free(slots);
    free(slot_of);
    *sorted = list;
    return distinct;
nomemory:
    free(slots);
    free(slot_of);
    free(list);
    PyErr_NoMemory();
    return -1;
}

static int append_run(PyObject *runs, int64_t key, Py_ssize_t start, Py_ssize_t count) {
    PyObject *run = Py_BuildValue("(LLnn)", (long long)(key >> HOUR_BITS),
                                  (long long)(key & ((INT64_C(1) << HOUR_BITS) - 1)), start,
                                  count);
    int ok = run != NULL && PyList_Append(runs, run) == 0;
    Py_XDECREF(run);
    return ok;
}

/* The (rank, hour, start, count) runs of ordered rows: of keys in order when sorted is
 * NULL, else of the distinct keys sort_keys gave. A new list, or NULL with an error. */
static PyObject *runs_of(const int64_t *keys, Py_ssize_t n, const KeySlot *sorted,
                         Py_ssize_t distinct) {
    PyObject *runs = PyList_New(0);
    if (runs == NULL) return NULL;
    if (sorted == NULL) {
        for (Py_ssize_t start = 0, i = 1; i <= n; i++) {
            if (i < n && keys[i] == keys[start]) continue;
            if (!append_run(runs, keys[start], start, i - start)) goto fail;
            start = i;
        }
        return runs;
    }
    for (Py_ssize_t k = 0; k < distinct; k++)
        if (!append_run(runs, sorted[k].key, sorted[k].next, sorted[k].count)) goto fail;
    return runs;
fail:
    Py_DECREF(runs);
    return NULL;
}

/* Each parsed row's key (rank << HOUR_BITS | hour) from the site cache, and whether
 * they are in order; 0 if a site is not cached or a time or rank is out of range:
 * then the rows stay as parsed, and flowray.ingest.pieces orders them. */
static int parsed_keys(const Column *sites, const int64_t *times, Py_ssize_t n,
                       Py_ssize_t shard_count, const char *ranks, long long hour_ms,
                       int64_t *keys, int *in_order) {
    *in_order = 1;
    if (cache_size == 0) return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *site = sites->data + sites->offsets[i];
        Py_ssize_t size = sites->offsets[i + 1] - sites->offsets[i];
        CacheSlot *slot = cache_find(site, size, shard_count, site_hash(site, size, shard_count));
        if (slot->site == NULL) return 0;
        int64_t t = times[i], rank, hour = t / hour_ms - (t % hour_ms < 0);
        memcpy(&rank, ranks + slot->shard * (Py_ssize_t)sizeof(int64_t), sizeof(rank));
        if (hour < 0 || hour >= (INT64_C(1) << HOUR_BITS) || rank < 0 || rank >= SHARDS_MAX)
            return 0;
        keys[i] = (rank << HOUR_BITS) | hour;
        if (i && keys[i] < keys[i - 1]) *in_order = 0;
    }
    return 1;
}

PyDoc_STRVAR(group_doc,
"group(offsets, data, ts, n, shard_count, ranks, hour_ms)\n"
"--\n\n"
"The order of n rows by (rank of their site's shard, hour of their time), stable.\n"
"offsets (n + 1 int32) and data are the site column's Arrow string buffers (from its\n"
"first row), ts its n int64 times, ranks the int64 rank of each of the shard_count\n"
"shards. Returns a list of the sites (bytes) whose shard it has not learned, if any\n"
"(a site may be listed more than once); else (order, runs): order the row numbers as\n"
"int64 bytes, or None if the rows are in order already, and runs the (rank, hour,\n"
"start, count) of the ordered rows, in order.");

static PyObject *group(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer offsets, data, ts, ranks;
    Py_ssize_t n, shard_count;
    PyObject *result = NULL, *missing = NULL, *runs = NULL, *order_bytes = NULL;
    long long hour_ms;
    int64_t *keys = NULL;
    KeySlot *sorted = NULL;
    if (!PyArg_ParseTuple(args, "y*y*y*nny*L", &offsets, &data, &ts, &n, &shard_count, &ranks,
                          &hour_ms))
        return NULL;
    /* by division: n or shard_count may be anything */
    if (n < 0 || offsets.len / (Py_ssize_t)sizeof(int32_t) <= n ||
        ts.len / (Py_ssize_t)sizeof(int64_t) < n || hour_ms < 1 || shard_count < 1 ||
        shard_count > SHARDS_MAX || ranks.len % (Py_ssize_t)sizeof(int64_t) != 0 ||
        ranks.len / (Py_ssize_t)sizeof(int64_t) != shard_count) {
        PyErr_SetString(PyExc_ValueError, "group: buffers shorter than n rows, or bad ranks");
        goto done;
    }
    keys = malloc((size_t)(n ? n : 1) * sizeof(int64_t));
    missing = PyList_New(0);
    if (keys == NULL) PyErr_NoMemory();
    if (keys == NULL || missing == NULL ||
        !row_shards((const int32_t *)offsets.buf, (const char *)data.buf, data.len, n,
                    shard_count, keys, missing))
        goto done;
    if (PyList_GET_SIZE(missing) > 0) {
        result = missing;
        missing = NULL;
        goto done;
    }
    const int64_t *times = (const int64_t *)ts.buf, *rank_of = (const int64_t *)ranks.buf;
    int in_order = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t t, rank;
        memcpy(&t, times + i, sizeof(t));
        memcpy(&rank, rank_of + keys[i], sizeof(rank));
        int64_t hour = t / hour_ms - (t % hour_ms < 0);
        if (hour < 0 || hour >= (INT64_C(1) << HOUR_BITS) || rank < 0 ||
            rank >= SHARDS_MAX) {
            PyErr_SetString(PyExc_ValueError, "group: a time or rank out of range");
            goto done;
        }
        keys[i] = (rank << HOUR_BITS) | hour;
        if (i && keys[i] < keys[i - 1]) in_order = 0;
    }
    if (in_order) {
        runs = runs_of(keys, n, NULL, 0);
        if (runs != NULL) result = Py_BuildValue("(OO)", Py_None, runs);
        goto done;
    }
    order_bytes = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int64_t));
    if (order_bytes == NULL) goto done;
    Py_ssize_t distinct = sort_keys(keys, n, (int64_t *)PyBytes_AS_STRING(order_bytes), &sorted);
    if (distinct < 0) goto done;
    runs = runs_of(keys, n, sorted, distinct);
    if (runs != NULL) result = Py_BuildValue("(OO)", order_bytes, runs);
done:
    free(keys);
    free(sorted);
    Py_XDECREF(missing);
    Py_XDECREF(runs);
    Py_XDECREF(order_bytes);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&data);
    PyBuffer_Release(&ts);
    PyBuffer_Release(&ranks);
    return result;
}

/* A column's Arrow buffers as (offsets, data, validity or None, nulls), its rows in
 * the given order (NULL: as parsed). */
static PyObject *column_tuple(const Column *col, Py_ssize_t n, const int64_t *order) {
    Py_ssize_t offsets_size = (n + 1) * (Py_ssize_t)sizeof(int32_t);
    PyObject *offsets = PyBytes_FromStringAndSize(order ? NULL : (const char *)col->offsets,
                                                  offsets_size);
    PyObject *data = PyBytes_FromStringAndSize(order ? NULL : (col->data ? col->data : ""),
                                               (Py_ssize_t)col->used);
    PyObject *valid = col->nulls ? PyBytes_FromStringAndSize(order ? NULL : (const char *)col->valid,
                                                             (n + 7) / 8)
                                 : (Py_INCREF(Py_None), Py_None);
    if (offsets == NULL || data == NULL || valid == NULL) {
        Py_XDECREF(offsets);
        Py_XDECREF(data);
        Py_XDECREF(valid);
        return NULL;
    }
    if (order != NULL) {
        int32_t *to_offsets = (int32_t *)PyBytes_AS_STRING(offsets);
        char *to_data = PyBytes_AS_STRING(data);
        uint8_t *to_valid = col->nulls ? (uint8_t *)PyBytes_AS_STRING(valid) : NULL;
        int32_t at = 0;
        if (to_valid != NULL) memset(to_valid, 0, (size_t)((n + 7) / 8));
        to_offsets[0] = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t row = order[i];
            int32_t lo = col->offsets[row], length = col->offsets[row + 1] - lo;
            memcpy(to_data + at, col->data + lo, (size_t)length);
            at += length;
            to_offsets[i + 1] = at;
            if (to_valid != NULL && (col->valid[row >> 3] >> (row & 7)) & 1)
                to_valid[i >> 3] |= (uint8_t)(1u << (i & 7));
        }
    }
    return Py_BuildValue("(NNNn)", offsets, data, valid, col->nulls);
}

typedef int (*Parser)(const char *, size_t, const Rules *, Out *);

/* The most events a body can hold, at most cap: NDJSON one a line, a JSON array one
 * per 12 bytes (an event and its comma take at least that: {"site":""},). */
static Py_ssize_t rows_bound(const char *body, Py_ssize_t size, int json, Py_ssize_t cap) {
    Py_ssize_t lines = 1;
    if (json) return size / 12 + 1 < cap ? size / 12 + 1 : cap;
    for (const char *p = body, *end = body + size;
         lines < cap && (p = memchr(p, '\n', (size_t)(end - p))) != NULL; p++)
        lines++;
    return lines;
}

/* Buffers for rows events of a body of size bytes; 0 if out of memory. */
static int allocate(Out *out, Py_ssize_t rows, Py_ssize_t size) {
    out->rows_max = rows;
    out->ts = calloc((size_t)rows, sizeof(int64_t));
    for (int c = 0; c < NCOLS; c++) {
        out->columns[c].data = malloc((size_t)size + 1);
        out->columns[c].offsets = calloc((size_t)rows + 1, sizeof(int32_t));
        out->columns[c].valid = calloc(((size_t)rows + 7) / 8, 1);
        if (!out->columns[c].data || !out->columns[c].offsets || !out->columns[c].valid)
            return 0;
    }
    return out->ts != NULL;
}

/* Parse a body with ``parse``; the tuple documented below, or None on doubt. */
static PyObject *columns_of(PyObject *args, Parser parse, int json) {
    PyObject *body;
    long long now_ms, ts_lo, ts_hi;
    Py_ssize_t path_max, visitor_max, events_max, size;
    const char *data;
    Out out;
    Rules rules;
    PyObject *result = NULL, *runs = NULL;
    int ok = 0, allocated = 1, routed = 0, in_order = 1;
    Py_ssize_t shard_count = 0;
    Py_buffer ranks = {0};
    long long hour_ms = 0;
    int64_t *keys = NULL, *order = NULL;
    KeySlot *sorted = NULL;
    /* bytes only: immutable, so no other thread can change it while the GIL is out */
    if (!PyArg_ParseTuple(args, "SLLLnnn|nz*L", &body, &now_ms, &ts_lo, &ts_hi, &path_max,
                          &visitor_max, &events_max, &shard_count, &ranks, &hour_ms))
        return NULL;
    memset(&out, 0, sizeof(out));
    if (shard_count < 0 || shard_count > SHARDS_MAX ||
        (shard_count > 0 && (hour_ms < 1 || ranks.buf == NULL ||
                             ranks.len % (Py_ssize_t)sizeof(int64_t) != 0 ||
                             ranks.len / (Py_ssize_t)sizeof(int64_t) != shard_count))) {
        PyErr_SetString(PyExc_ValueError, "bad routing: shard_count, ranks or hour_ms");
        goto done;
    }
    data = PyBytes_AS_STRING(body);
    size = PyBytes_GET_SIZE(body);
    rules.now_ms = now_ms;
    rules.ts_lo = ts_lo;
    rules.ts_hi = ts_hi;
    {
        const Py_ssize_t chars_max[NCOLS] = RULE_CHARS_MAX(path_max, visitor_max);
        memcpy(rules.chars_max, chars_max, sizeof(chars_max));
    }
    out.sites_normal = 1;
    if (size > INT32_MAX || events_max < 1) goto doubt; /* 32-bit offsets */
    Py_BEGIN_ALLOW_THREADS
    allocated = allocate(&out, rows_bound(data, size, json, events_max), size);
    if (allocated) ok = parse(data, (size_t)size, &rules, &out);
    Py_END_ALLOW_THREADS
    if (!allocated) {
        PyErr_NoMemory();
        goto done;
    }
    if (!ok || out.n == 0) goto doubt;
    {
        Py_ssize_t n = out.n;
        /* In routing order, when asked and every site is in its normal form and cached
         * (with the GIL held: the cache is shared). Rows from other bodies stay as
         * parsed, and flowray.ingest.pieces orders them. */
        if (shard_count > 0 && out.sites_normal) {
            keys = malloc((size_t)n * sizeof(int64_t));
            if (keys == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            routed = parsed_keys(&out.columns[COL_SITE], out.ts, n, shard_count,
                                 (const char *)ranks.buf, hour_ms, keys, &in_order);
        }
        if (routed && !in_order) {
            order = malloc((size_t)n * sizeof(int64_t));
            if (order == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            Py_ssize_t distinct = sort_keys(keys, n, order, &sorted);
            if (distinct < 0) goto done;
            runs = runs_of(keys, n, sorted, distinct);
        } else if (routed) {
            runs = runs_of(keys, n, NULL, 0);
        } else {
            runs = Py_None;
            Py_INCREF(runs);
        }
        if (runs == NULL) goto done;
        PyObject *ts = PyBytes_FromStringAndSize(order ? NULL : (const char *)out.ts,
                                                 n * (Py_ssize_t)sizeof(int64_t));
        PyObject *list = PyTuple_New(NCOLS);
        if (ts == NULL || list == NULL) {
            Py_XDECREF(ts);
            Py_XDECREF(list);
            goto done;
        }
        if (order != NULL) {
            int64_t *to = (int64_t *)PyBytes_AS_STRING(ts);
            for (Py_ssize_t i = 0; i < n; i++) to[i] = out.ts[order[i]];
        }
        for (int c = 0; c < NCOLS; c++) {
            PyObject *col = column_tuple(&out.columns[c], n, order);
            if (col == NULL) {
                Py_DECREF(ts);
                Py_DECREF(list);
                goto done;
            }
            PyTuple_SET_ITEM(list, c, col);
        }
        result = Py_BuildValue("(nNNOO)", n, ts, list, out.sites_normal ? Py_True : Py_False, runs);
    }
    goto done;
doubt:
    result = Py_None;
    Py_INCREF(result);
done:
    free(out.ts);
    free_columns(out.columns);
    free(keys);
    free(order);
    free(sorted);
    Py_XDECREF(runs);
    if (ranks.obj != NULL) PyBuffer_Release(&ranks);
    return result;
}

#define COLUMNS_DOC                                                                        \
    "Returns (n, ts, columns, sites_normal, runs): ts the int64 times (a missing or null\n" \
    "ts is now_ms) as bytes, columns the (offsets, data, validity or None, null count)\n" \
    "of site, path, referrer, ua, visitor and id as Arrow string buffers (an empty id is\n" \
    "null), sites_normal whether every site is already in normalize_site's form. With\n" \
    "shard_count, ranks and hour_ms (as for group), the rows come in group's order and\n" \
    "runs are its runs, when every site is in its normal form and its shard is learned;\n" \
    "else the rows come as parsed and runs is None."

PyDoc_STRVAR(ndjson_doc,
"ndjson(body, now_ms, ts_lo, ts_hi, path_chars_max, visitor_chars_max, events_max, shard_count=0, ranks=None, hour_ms=0)\n"
"--\n\n"
"Columns of an NDJSON body of flat event objects, or None at the first doubt (bytes\n"
"that are not UTF-8 are one).\n\n"
COLUMNS_DOC);

static PyObject *ndjson(PyObject *self, PyObject *args) {
    (void)self;
    return columns_of(args, parse_ndjson, 0);
}

PyDoc_STRVAR(json_doc,
"json(body, now_ms, ts_lo, ts_hi, path_chars_max, visitor_chars_max, events_max, shard_count=0, ranks=None, hour_ms=0)\n"
"--\n\n"
"Columns of a JSON body (an array of flat event objects, or one), or None at the\n"
"first doubt (bytes that are not UTF-8 are one).\n\n"
COLUMNS_DOC);

static PyObject *json(PyObject *self, PyObject *args) {
    (void)self;
    return columns_of(args, parse_json, 1);
}

/* ---- ids seen: which (site, id) pairs a live count has counted already -------------
 *
 * A set of (site, event id) pairs, each kept as a 128-bit hash (two independent 64-bit
 * lanes, seeded per process) in an open-addressing table: 16 bytes a slot at a load of
 * at most 0.7, where a Python set of (site, id) tuples took over 200 bytes a pair and a
 * loop over the pairs about 0.7 us each. Two different pairs share a hash with a chance
 * of about 2^-128 per pair of pairs: never, in practice.
 */
#define SEEN_CAPSULE "flowray.ingest._native.seen"
#define SEEN_PREFETCH 16 /* rows */

typedef struct {
    uint64_t *slots; /* 2 per pair: (a, b); a == 0: empty (a hash's a is never 0) */
    Py_ssize_t size, used; /* size: a power of two */
} Seen;

/* Zeroed slots for a table of size pairs, in their own mapping: large tables ask for
 * huge pages, since every lookup lands on a random page (on the reference machine a
 * lookup in a table of a few MiB cost about 200 ns in 4 KiB pages, most of it the
 * page-table walk). NULL when out of memory. */
static uint64_t *slots_new(Py_ssize_t size) {
    size_t bytes = (size_t)size * 2 * sizeof(uint64_t);
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
#ifdef MADV_HUGEPAGE
    if (bytes >= ((size_t)2 << 20)) madvise(p, bytes, MADV_HUGEPAGE); /* a hint */
#endif
    return p;
}

static void slots_free(uint64_t *slots, Py_ssize_t size) {
    if (slots != NULL) munmap(slots, (size_t)size * 2 * sizeof(uint64_t));
}

static void seen_free(PyObject *capsule) {
    Seen *seen = PyCapsule_GetPointer(capsule, SEEN_CAPSULE);
    if (seen != NULL) slots_free(seen->slots, seen->size);
    free(seen);
}

PyDoc_STRVAR(seen_new_doc,
"seen_new()\n"
"--\n\n"
"An empty set of (site, id) pairs for first_seen().");

static PyObject *seen_new(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    Seen *seen = calloc(1, sizeof(Seen));
    if (seen == NULL) return PyErr_NoMemory();
    seen->size = 1024;
    seen->slots = slots_new(seen->size);
    if (seen->slots == NULL) {
        free(seen);
        return PyErr_NoMemory();
    }
    PyObject *capsule = PyCapsule_New(seen, SEEN_CAPSULE, seen_free);
    if (capsule == NULL) {
        slots_free(seen->slots, seen->size);
        free(seen);
    }
    return capsule;
}

/* One lane of a pair's hash: the lengths, then the site's bytes, then the id's, each
 * zero-padded to 8; every step (rotate, xor a word, multiply by an odd number) is a
 * bijection of the state, and splitmix64's finalizer mixes the end. */
static uint64_t lane_bytes(uint64_t h, const char *p, Py_ssize_t n, int rot, uint64_t odd) {
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = ((h << rot | h >> (64 - rot)) ^ w) * odd;
    }
    if (n > 0) {
        uint64_t w = 0;
        memcpy(&w, p, (size_t)n);
        h = ((h << rot | h >> (64 - rot)) ^ w) * odd;
    }
    return h;
}

static void pair_hash(const char *site, Py_ssize_t site_size, const char *id, Py_ssize_t id_size,
                      uint64_t *a, uint64_t *b) {
    uint64_t sizes = (uint64_t)site_size ^ (uint64_t)id_size << 32;
    uint64_t ha = mix64(hash_seed ^ 0x243F6A8885A308D3ULL ^ sizes);
    uint64_t hb = mix64(~hash_seed ^ 0x13198A2E03707344ULL ^ (sizes * 0x9E3779B97F4A7C15ULL));
    ha = lane_bytes(lane_bytes(ha, site, site_size, 23, 0x9E3779B97F4A7C15ULL), id, id_size, 23,
                    0x9E3779B97F4A7C15ULL);
    hb = lane_bytes(lane_bytes(hb, site, site_size, 29, 0xC2B2AE3D27D4EB4FULL), id, id_size, 29,
                    0xC2B2AE3D27D4EB4FULL);
    *a = mix64(ha) | 1; /* never 0: 0 marks an empty slot */
    *b = mix64(hb ^ 0xA0761D6478BD642FULL);
}

/* Add (a, b); 1 if it was not there. The table has room (see seen_reserve). */
static int seen_add(Seen *seen, uint64_t a, uint64_t b) {
    Py_ssize_t mask = seen->size - 1, at = (Py_ssize_t)(b & (uint64_t)mask);
    for (;; at = (at + 1) & mask) {
        uint64_t *slot = seen->slots + 2 * at;
        if (slot[0] == 0) {
            slot[0] = a;
            slot[1] = b;
            seen->used++;
            return 1;
        }
        if (slot[0] == a && slot[1] == b) return 0;
    }
}

/* Room for n more pairs at a load of at most 0.7; 0 when out of memory. */
static int seen_reserve(Seen *seen, Py_ssize_t n) {
    if (10 * (seen->used + n) <= 7 * seen->size) return 1;
    Py_ssize_t size = seen->size;
    while (10 * (seen->used + n) > 7 * size) size *= 2;
    uint64_t *old = seen->slots, *slots = slots_new(size);
    if (slots == NULL) return 0;
    Py_ssize_t old_size = seen->size;
    seen->slots = slots;
    seen->size = size;
    seen->used = 0;
    const uint64_t mask = (uint64_t)size - 1;
    for (Py_ssize_t i = 0; i < old_size; i++) { /* each new slot fetched ahead, as below */
        Py_ssize_t ahead = i + 4 * SEEN_PREFETCH;
        if (ahead < old_size && old[2 * ahead] != 0)
            __builtin_prefetch(slots + 2 * (old[2 * ahead + 1] & mask), 1);
        if (old[2 * i] != 0) seen_add(seen, old[2 * i], old[2 * i + 1]);
    }
    slots_free(old, old_size);
    return 1;
}

/* The bytes of row i of a string column (int32 offsets), or 0 with an error set. */
static int string_at(const Py_buffer *offsets, const Py_buffer *data, Py_ssize_t i,
                     const char **p, Py_ssize_t *size) {
    int32_t lo, hi;
    memcpy(&lo, (const int32_t *)offsets->buf + i, sizeof(lo));
    memcpy(&hi, (const int32_t *)offsets->buf + i + 1, sizeof(hi));
    if (lo < 0 || hi < lo || hi > data->len) {
        PyErr_SetString(PyExc_ValueError, "first_seen: string offsets out of range");
        return 0;
    }
    *p = (const char *)data->buf + lo;
    *size = hi - lo;
    return 1;
}

PyDoc_STRVAR(first_seen_doc,
"first_seen(seen, n, site_offsets, site_data, site_at, id_offsets, id_data, id_valid, id_at)\n"
"--\n\n"
"For n rows of two Arrow string columns (site, id) from row site_at and id_at of their\n"
"buffers (int32 offsets, data, and for ids a validity bitmap or None), add each\n"
"(site, id) pair to the set seen and return n bytes: 1 where the row counts (its id is\n"
"null, or its pair was not in the set, nor earlier in these rows), 0 where it does not.\n"
"Checks every row before it adds any.");

static PyObject *first_seen(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule, *valid_obj, *result = NULL;
    uint64_t *hashes = NULL;
    Py_ssize_t n, site_at, id_at;
    Py_buffer site_offsets, site_data, id_offsets, id_data, id_valid = {0};
    if (!PyArg_ParseTuple(args, "Ony*y*ny*y*On", &capsule, &n, &site_offsets, &site_data,
                          &site_at, &id_offsets, &id_data, &valid_obj, &id_at))
        return NULL;
    Seen *seen = PyCapsule_GetPointer(capsule, SEEN_CAPSULE);
    int has_valid = valid_obj != Py_None;
    if (seen == NULL || (has_valid && PyObject_GetBuffer(valid_obj, &id_valid, PyBUF_SIMPLE) < 0))
        goto done;
    const Py_ssize_t word = (Py_ssize_t)sizeof(int32_t);
    /* by division and subtraction: n and the starts may be anything */
    if (n < 0 || site_at < 0 || id_at < 0 || site_offsets.len / word - 1 - site_at < n ||
        id_offsets.len / word - 1 - id_at < n ||
        (has_valid && (id_valid.len > PY_SSIZE_T_MAX / 8 || id_valid.len * 8 - id_at < n))) {
        PyErr_SetString(PyExc_ValueError, "first_seen: buffers shorter than n rows");
        goto done;
    }
    const uint8_t *bits = has_valid ? (const uint8_t *)id_valid.buf : NULL;
    for (Py_ssize_t i = 0; i < n; i++) { /* check all first: nothing half added */
        const char *p;
        Py_ssize_t size;
        if (!string_at(&site_offsets, &site_data, site_at + i, &p, &size) ||
            !string_at(&id_offsets, &id_data, id_at + i, &p, &size))
            goto done;
    }
    if (!seen_reserve(seen, n)) {
        PyErr_NoMemory();
        goto done;
    }
    /* All hashes first, then the lookups, each slot fetched SEEN_PREFETCH rows ahead:
     * the lookups' cache misses overlap instead of coming one after another. */
    hashes = malloc((size_t)(n ? n : 1) * 2 * sizeof(uint64_t));
    if (hashes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, n);
    if (result == NULL) goto done;
    char *keep = PyBytes_AS_STRING(result);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t at = id_at + i;
        keep[i] = bits == NULL || (bits[at >> 3] >> (at & 7) & 1); /* 0: no id, for now */
        if (!keep[i]) continue;
        const char *site = NULL, *id = NULL;
        Py_ssize_t site_size = 0, id_size = 0;
        string_at(&site_offsets, &site_data, site_at + i, &site, &site_size);
        string_at(&id_offsets, &id_data, id_at + i, &id, &id_size);
        pair_hash(site, site_size, id, id_size, hashes + 2 * i, hashes + 2 * i + 1);
    }
    const uint64_t mask = (uint64_t)seen->size - 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + SEEN_PREFETCH < n && keep[i + SEEN_PREFETCH])
            __builtin_prefetch(seen->slots + 2 * (hashes[2 * (i + SEEN_PREFETCH) + 1] & mask), 1);
        /* no id: every such event counts; else whether its pair is new */
        keep[i] = !keep[i] || seen_add(seen, hashes[2 * i], hashes[2 * i + 1]);
    }
done:
    free(hashes);
    PyBuffer_Release(&site_offsets);
    PyBuffer_Release(&site_data);
    PyBuffer_Release(&id_offsets);
    PyBuffer_Release(&id_data);
    if (has_valid && id_valid.obj != NULL) PyBuffer_Release(&id_valid);
    return result;
}

PyDoc_STRVAR(seen_size_doc,
"seen_size(seen)\n"
"--\n\n"
"(pairs held, bytes the table takes) of a set from seen_new().");

static PyObject *seen_size(PyObject *self, PyObject *capsule) {
    (void)self;
    Seen *seen = PyCapsule_GetPointer(capsule, SEEN_CAPSULE);
    if (seen == NULL) return NULL;
    return Py_BuildValue("(nn)", seen->used, seen->size * 2 * (Py_ssize_t)sizeof(uint64_t));
}

static PyMethodDef methods[] = {
    {"ndjson", ndjson, METH_VARARGS, ndjson_doc},
    {"json", json, METH_VARARGS, json_doc},
    {"group", group, METH_VARARGS, group_doc},
    {"learn", learn, METH_VARARGS, learn_doc},
    {"seen_new", seen_new, METH_NOARGS, seen_new_doc},
    {"first_seen", first_seen, METH_VARARGS, first_seen_doc},
    {"seen_size", seen_size, METH_O, seen_size_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "flowray.ingest._native",
    "flowray's ingest parsers in C (optional: flowray.ingest.fastparse works without them).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    FILE *random = fopen("/dev/urandom", "rb");
    if (random == NULL || fread(&hash_seed, sizeof(hash_seed), 1, random) != 1)
        hash_seed = mix64((uint64_t)(uintptr_t)&hash_seed ^ (uint64_t)time(NULL));
    if (random != NULL) fclose(random);
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "RULES_DIGEST", RULES_DIGEST) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
