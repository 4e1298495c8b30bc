"""Reading fibers: CLIP scoring (:mod:`.semantics`), the oracle's twin on the toy world (:mod:`.toy_scores`),
per-class statistics (:mod:`.stats`), SING's null space (:mod:`.nullspace`) and the shortcut audit
(:mod:`.shortcut`)."""
