"""``python -m moe_course.experiments list | run NAME | show NAME``: the command line of notebooks 04-09's sweeps."""

from moe_course.experiments.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
