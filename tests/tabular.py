"""Reading back, in tests, the CSV tables widedeep writes."""

from __future__ import annotations

import pandas as pd

# pandas 2's default parser can miss a float's last digit (seen under Python 3.10 with pandas
# 2.3); pandas 3 reads every float as written and deprecates the option.
_EXACT = {"float_precision": "round_trip"} if int(pd.__version__.split(".")[0]) < 3 else {}


def read_table(path) -> pd.DataFrame:
    """The table at ``path``, every float as written."""
    return pd.read_csv(path, **_EXACT)
