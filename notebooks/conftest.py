# The language editions (notebooks/zh/) run the English notebooks' code byte for byte (tests/test_i18n.py proves
# it), so nbmake executes the English notebooks only.
collect_ignore = ["zh"]
