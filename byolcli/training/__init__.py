"""The training wing: `byol train`. The plan for this machine and its rules (rules, plan, probe,
train_flags), BYOL's networks, optimizer and step (byol, optim, step), the data path (data, augment),
several processes (distributed), the loop (engine), the export and the choice among candidates with
labels (candidates), all driven by train.

It imports the core, and of the evaluation wing what that offers: the probes (metrics), the label-free
measures (label_free) and the run's report (judge, html_report). Nothing imports the training wing
but the CLI."""
