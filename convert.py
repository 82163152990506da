"""Convert weights between PyTorch and fcn-jax: same as `fcn-jax convert` (see --help)."""

import sys

from fcn_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
