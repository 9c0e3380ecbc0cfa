/*
 * The event rules for flowray/ingest/_native.c, generated from
 * flowray/ingest/rules.py by `python -m flowray.ingest.rules --write`: do not edit.
 * tests/test_rules.py fails when this file is not what the rules generate.
 */
#ifndef FLOWRAY_INGEST_RULES_H
#define FLOWRAY_INGEST_RULES_H

/* The string columns, in the order of EVENT_SCHEMA after ts. */
enum { COL_SITE, COL_PATH, COL_REFERRER, COL_UA, COL_VISITOR, COL_ID, COL_NAME, COL_PROPS, NCOLS };
enum { FIELD_TS = NCOLS, NFIELDS };

/* The longest value of each column in characters, from the limits the parser is
 * called with; PY_SSIZE_T_MAX where there is none (the site's rules are below). */
#define RULE_CHARS_MAX(path_chars_max, visitor_chars_max) { \
    PY_SSIZE_T_MAX, /* site */ \
    path_chars_max, /* path */ \
    path_chars_max, /* referrer */ \
    path_chars_max, /* ua */ \
    visitor_chars_max, /* visitor */ \
    visitor_chars_max, /* id */ \
    visitor_chars_max, /* name */ \
    path_chars_max, /* props */ \
}

/* Whether "" in column c is stored as null. */
#define RULE_EMPTY_IS_NULL(c) ((c) == COL_ID)

/* A normalized site: at most this many bytes, in labels of at most this many. */
#define RULE_SITE_BYTES_MAX 253
#define RULE_SITE_LABEL_BYTES_MAX 63

/* The field a key names, or -1 for a key the schema does not have. */
static int field_of(const char *key, size_t n) {
    switch (n) {
    case 2:
        if (!memcmp(key, "ts", 2)) return FIELD_TS;
        if (!memcmp(key, "ua", 2)) return COL_UA;
        if (!memcmp(key, "id", 2)) return COL_ID;
        return -1;
    case 4:
        if (!memcmp(key, "site", 4)) return COL_SITE;
        if (!memcmp(key, "path", 4)) return COL_PATH;
        if (!memcmp(key, "name", 4)) return COL_NAME;
        return -1;
    case 5:
        if (!memcmp(key, "props", 5)) return COL_PROPS;
        return -1;
    case 7:
        if (!memcmp(key, "visitor", 7)) return COL_VISITOR;
        return -1;
    case 8:
        if (!memcmp(key, "referrer", 8)) return COL_REFERRER;
        return -1;
    default:
        return -1;
    }
}

/* See header_digest in rules.py. */
#define RULES_DIGEST "6f272a1b2ba68e4b"

#endif
