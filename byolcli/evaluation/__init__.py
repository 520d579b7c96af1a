"""The evaluation wing: how good is an encoder. With labels, kNN and a linear probe beside the
weights it started from and a random-init network (evaluate, metrics, logistic); without labels, the
label-free measures and the report page (label_free, judge, html_report).

It imports the core, and of the vectors wing what that offers: a folder's stored vectors (store) and
near-duplicate finding (duplicates). It offers the training wing metrics, label_free, judge and
html_report."""
