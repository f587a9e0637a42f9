"""Check (or, with --fix, apply) .clang-format on the C/CUDA lines that changed since a base commit.

    python3 tests/lint/format_changed.py [--fix] BASE

The change is the working tree against BASE (commits, what is not committed yet and new files not yet added;
renames followed). A line
counts as changed only where it is new: a line that already stood, character for character, in some C/CUDA file
of BASE was moved, not written, and keeps its hand layout (code that moves between files or to a renamed file is
not reformatted by the move). The changed lines are given to clang-format (--lines); any difference is printed as a
diff and the exit status is 1. --fix writes clang-format's result into the files instead. Exit status 0 when
nothing differs."""

import difflib
import re
import subprocess
import sys

EXTENSIONS = ("*.c", "*.h", "*.cu", "*.cuh")


def git(*args):
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def base_lines(base):
    """Every line of every C/CUDA file of BASE."""
    names = [n for n in git("ls-tree", "-r", "--name-only", base).splitlines()
             if n.endswith(tuple(e[1:] for e in EXTENSIONS))]
    batch = "".join(f"{base}:{n}\n" for n in names)
    out = subprocess.run(["git", "cat-file", "--batch"], input=batch.encode(), check=True,
                         capture_output=True).stdout.decode(errors="replace")
    return set(out.splitlines())


def new_lines(base, known):
    """{path: [line numbers]} of the working tree's lines that are new since BASE."""
    diff = git("diff", "-U0", "-M", "--no-color", "--diff-filter=AMR", base, "--", *EXTENSIONS)
    changed, path, number = {}, None, 0
    for line in diff.splitlines():
        if line.startswith("+++ "):
            path = line[6:] if line.startswith("+++ b/") else None
        elif line.startswith("@@"):
            number = int(re.match(r"@@ -\S+ \+(\d+)", line).group(1))
        elif line.startswith("+") and path:
            if line[1:] not in known:
                changed.setdefault(path, []).append(number)
            number += 1
    untracked = git("ls-files", "--others", "--exclude-standard", "--", *EXTENSIONS).splitlines()
    for path in untracked:  # new files not yet added: every line of theirs is a candidate
        with open(path, encoding="utf-8", errors="replace") as f:
            numbers = [i + 1 for i, line in enumerate(f.read().splitlines()) if line not in known]
        if numbers:
            changed[path] = numbers
    return changed


def ranges(numbers):
    start = prev = numbers[0]
    for n in numbers[1:]:
        if n != prev + 1:
            yield start, prev
            start = n
        prev = n
    yield start, prev


def main(argv):
    fix = "--fix" in argv
    args = [a for a in argv if a != "--fix"]
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    base = args[0]
    differ = 0
    for path, numbers in sorted(new_lines(base, base_lines(base)).items()):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        spans = [f"--lines={a}:{b}" for a, b in ranges(numbers)]
        formatted = subprocess.run(["clang-format", "--style=file", f"--assume-filename={path}", *spans],
                                   input=text, check=True, capture_output=True, text=True).stdout
        if formatted == text:
            continue
        differ += 1
        if fix:
            with open(path, "w", encoding="utf-8") as f:
                f.write(formatted)
            print(f"formatted the new lines of {path}")
        else:
            sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), formatted.splitlines(True),
                                                       f"a/{path}", f"b/{path}"))
    return 1 if differ and not fix else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
