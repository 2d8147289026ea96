"""The machinery that builds every notebook of the course, for maintainers and instructors (learners skip it).

=====================  ==========================================================================
``notebooks``          learner copies from the solutions, execution, consistency checks
                       (``python -m moe_course.course.notebooks generate|execute|check``)
``readme_tables``      the README's tables, RESULTS.md and INSTRUCTORS.md's plans, generated from
                       ``data/results/`` (``python -m moe_course.course.readme_tables``)
``course_table``       the whole course in one table: each notebook's headline number and its paper (08)
``gpu_results``        the GPU suite's stored capstone, read back (``python -m moe_course.course.gpu_results``)
``handout``            the learners' zip without the solutions (``make handout``)
``links``              the repository URL, branch, Colab and Binder badges
                       (``python -m moe_course.course.links set-repo OWNER/NAME``)
=====================  ==========================================================================
"""
