"""Turning public datasets into the course's LLaVA format: `python -m course_lib.prepare <dataset> ...`.

Every dataset goes through the one pipeline in `convert.prepare`: read the source records, adapt each to
the course format, check it with the same code training uses (`course_lib.data.records.to_sample`), place
its images, write `OUT/<name>.json` atomically and print what was kept and what was skipped, and why.
A dataset module (`cc3m`, `llava_instruct`, `sharegpt4o`, `textocr`) only says where its files are and
how one of its records maps to the course format. Commands and layouts: course_lib/prepare/README.md.
"""
