#!/usr/bin/env python3
"""How a drop-behind reader should read (issue 15, goal 5; profile.md,
"Scrub with the kernel's read-ahead"). Reads the allocated ranges of each
FILE (SEEK_DATA) in 1 MiB units, one thread per file, in one of these modes:

  seq       pread each unit; the kernel reads ahead (the descriptor's default)
  seqdrop   seq, then fadvise(DONTNEED) from LAG units back to the unit's end
  will      fadvise(RANDOM) (no kernel read-ahead), fadvise(WILLNEED) AHEAD
            units ahead, pread each unit (scrub's reader of 2026-12-02)
  willdrop  will, then fadvise(DONTNEED) of the unit read

Usage: [AHEAD=8] [LAG=1] bench/read_patterns.py MODE FILE...
Time it with the page cache dropped first; `fincore FILE` shows what stayed.
"""
import os
import sys
import threading

UNIT = 1 << 20
AHEAD = int(os.environ.get("AHEAD", "8"))
LAG = int(os.environ.get("LAG", "1"))


def units(fd):
    end, pos = os.fstat(fd).st_size, 0
    while pos < end:
        try:
            pos = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        while pos < hole:
            yield pos
            pos += UNIT


def read(mode, path):
    fd = os.open(path, os.O_RDONLY)
    us = list(units(fd))
    if mode.startswith("will"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for q in us[: AHEAD + 1]:
            os.posix_fadvise(fd, q, UNIT, os.POSIX_FADV_WILLNEED)
    for i, p in enumerate(us):
        if mode.startswith("will") and i > 0 and i + AHEAD < len(us):
            os.posix_fadvise(fd, us[i + AHEAD], UNIT, os.POSIX_FADV_WILLNEED)
        os.pread(fd, UNIT, p)
        if mode == "willdrop":
            os.posix_fadvise(fd, p, UNIT, os.POSIX_FADV_DONTNEED)
        elif mode == "seqdrop":
            back = min(LAG, i) * UNIT
            os.posix_fadvise(fd, p - back, UNIT + back, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def main():
    mode, files = sys.argv[1], sys.argv[2:]
    if mode not in ("seq", "seqdrop", "will", "willdrop") or not files:
        sys.exit(__doc__)
    ths = [threading.Thread(target=read, args=(mode, f)) for f in files]
    for t in ths:
        t.start()
    for t in ths:
        t.join()


if __name__ == "__main__":
    main()
