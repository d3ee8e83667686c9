"""Unit-test generation for a focal function (`rotary tests`, the worker's GenerateTests, `rotary bench tests`).

languages.py: grammars, language detection, parsing, the errors of bad input · focal.py: finding the
focal function · layout.py: the test file and its names · patterns.py: tree-sitter line patterns ·
drafting.py: the drafters · generate.py: the generation loop (through the completion front) ·
sandbox.py: running generated tests. Nothing is imported here: the CLI finds a focal function
without loading torch.
"""
