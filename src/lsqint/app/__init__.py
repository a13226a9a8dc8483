"""The command line and what it drives: cli (argparse), workflow (train float / QAT), runs
(run folders, checkpoint -> model), evaluation, infer, sweep, demo, bench. The top layer: it
imports everything below and nothing imports it."""
