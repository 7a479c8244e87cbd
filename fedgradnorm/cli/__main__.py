"""`python -m fedgradnorm.cli`: the `fedgradnorm` command."""

import sys

from fedgradnorm.cli.main import main

sys.exit(main())
