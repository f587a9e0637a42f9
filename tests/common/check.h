/* Tiny test vocabulary shared by every test program (host and GPU).
 *
 * A test program is a standalone executable. It runs its cases, prints one line per failed check, and
 * exits with TEST_PASS (0), TEST_FAIL (1) or TEST_SKIP (77, e.g. not enough GPUs). tests/run_tests.sh counts the
 * programs and prints `N passed, N failed, N skipped`. */
#ifndef EP_TESTS_CHECK_H
#define EP_TESTS_CHECK_H

#include <stdio.h>

#define TEST_PASS 0
#define TEST_FAIL 1
#define TEST_SKIP 77

/* Failed checks in this program so far; a program exits TEST_FAIL when it is non-zero. One counter per program,
 * not per file: a weak definition, which the linker merges, so that CHECKs in a shared file linked into a test
 * (tests/gpu/normal_cases.c) count towards that test's result. */
__attribute__((weak)) int g_check_failures = 0;

/* CHECK(cond, fmt, ...): on failure print file:line, the condition and a message; keep going. */
#define CHECK(cond, ...)                                                       \
  do {                                                                         \
    if (!(cond)) {                                                             \
      g_check_failures++;                                                      \
      fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);          \
      fprintf(stderr, __VA_ARGS__);                                            \
      fprintf(stderr, "\n");                                                   \
    }                                                                          \
  } while (0)

/* CHECK_EQ_INT(a, b, what): integer equality with both values in the message. */
#define CHECK_EQ_INT(a, b, what)                                                               \
  CHECK((long long)(a) == (long long)(b), "%s: got %lld, want %lld", (what), (long long)(a), \
        (long long)(b))

/* Exit status for the end of main(). */
#define TEST_RESULT() (g_check_failures == 0 ? TEST_PASS : TEST_FAIL)

#endif /* EP_TESTS_CHECK_H */
