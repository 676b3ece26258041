"""The command-line side of the commands (flags, their types and defaults, one-line errors): the only place in
the library that knows argparse. Each command's `main(argv)` turns its flags into one settings object and hands
it to the library (`flowmo_fast.tokenize.run`, `flowmo_fast.detokenize.run`); `python -m flowmo_fast.tokenize`
and `python -m flowmo_fast.detokenize` run `flowmo_fast.cli.tokenize` and `flowmo_fast.cli.detokenize`."""
