"""Shared vocabulary of the Python tests (the counterpart of tests/common/check.h).

A test is a standalone script: it prints one line per check ("PASS name" / "FAIL name: detail") and exits 0 (all
passed), 1 (a check failed) or 77 (skipped: it says why). tests/run_tests.sh counts each script as one test."""

import os
import sys

TEST_PASS, TEST_FAIL, TEST_SKIP = 0, 1, 77
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON_DIR = os.path.join(REPO, "python")


class Checker:
    def __init__(self, prefix=""):
        self.prefix = prefix
        self.failures = 0
        self.count = 0

    def check(self, name, ok, detail=""):
        """Record one check; print its line. Returns ok."""
        self.count += 1
        if ok:
            print(f"{self.prefix}PASS {name}", flush=True)
        else:
            self.failures += 1
            print(f"{self.prefix}FAIL {name}" + (f": {detail}" if detail else ""), flush=True)
        return bool(ok)

    def raises(self, name, exc_types, fn, *words):
        """Check that fn() raises one of exc_types and that the message contains every word."""
        try:
            fn()
        except exc_types as e:
            msg = str(e)
            missing = [w for w in words if w not in msg]
            return self.check(name, not missing, f"message lacks {missing}: {msg!r}" if missing else "")
        except Exception as e:  # the wrong kind of error
            return self.check(name, False, f"raised {type(e).__name__}: {e}")
        return self.check(name, False, "did not raise")

    def result(self):
        return TEST_FAIL if self.failures else TEST_PASS

    def exit(self):
        print(f"{self.prefix}{self.count - self.failures} of {self.count} checks passed", flush=True)
        sys.exit(self.result())


def skip(reason):
    print(f"SKIP: {reason}", flush=True)
    sys.exit(TEST_SKIP)


def use_package():
    """Make `import ep` find python/ep whatever PYTHONPATH says."""
    if PYTHON_DIR not in sys.path:
        sys.path.insert(0, PYTHON_DIR)
