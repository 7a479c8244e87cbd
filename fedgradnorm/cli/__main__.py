"""`python -m fedgradnorm.cli`: the `fedgradnorm` command."""

import sys

from fedgradnorm.cli.app import main

sys.exit(main())
