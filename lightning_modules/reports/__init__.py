"""Reports written from finished runs: a sweep's table and plots (``sweep``), the transfer study (``transfer``)."""
