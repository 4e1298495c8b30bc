"""What people look at: Jupyter widgets (:mod:`.widgets`) and the ``make demo`` report (:mod:`.demo`)."""
