"""Train an FCN: same as `fcn-jax train` (see --help). With no arguments, trains on the built-in dataset."""

import sys

from fcn_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
