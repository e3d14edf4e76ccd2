"""Choosing a study's trial without target labels, with source-only as the default.

No label-free score is safe alone: on some shifts the DANN trial a score ranks first
is far below source-only on the target (benchmarks/shifts.md). So source-only is kept
unless a DANN trial beats it with consistent evidence:

- it beats source-only on every score in `evidence` (by default snd and
  target_entropy), on the validation split;
- its val source accuracy is at most `accuracy_margin` below source-only's;
- its val target images given the most given class are at most `share_margin` more
  than source-only's (its predictions have not drifted toward fewer classes).

Among the DANN trials that qualify, the one with the best sum of its ranks by the
evidence scores is chosen. A trial is a row of tuning.trial_rows: `mode`, `state`,
`val_<score>` for each label-free score and `val_target_top_share`.
"""

EVIDENCE = ("snd", "target_entropy")
ACCURACY_MARGIN = 0.02
SHARE_MARGIN = 0.1


def completed(rows):
    """The rows of the trials that were scored (neither ruled out nor running)."""
    return [row for row in rows if row["state"] == "complete"]


def best_by(rows, scores):
    """The row with the best sum of ranks (0 = best) by `scores`; ties go to the
    first score, then to the earlier trial. None for no rows."""
    rank = {id(row): 0 for row in rows}
    for score in scores:
        for place, row in enumerate(sorted(rows, key=lambda r: -r[f"val_{score}"])):
            rank[id(row)] += place
    return min(rows, key=lambda row: (rank[id(row)], -row[f"val_{scores[0]}"],
                                      row["trial"]), default=None)


def falls_short(row, source_only, evidence, accuracy_margin, share_margin):
    """Why the DANN trial `row` does not beat `source_only` with consistent evidence,
    or None when it does."""
    behind = [score for score in evidence
              if row[f"val_{score}"] <= source_only[f"val_{score}"]]
    if behind:
        return f"not above source-only on {' and '.join(behind)}"
    drop = source_only["val_source_accuracy"] - row["val_source_accuracy"]
    if drop > accuracy_margin:
        return (f"val source accuracy {row['val_source_accuracy']:.4f}, more than "
                f"{accuracy_margin} below source-only's")
    growth = row["val_target_top_share"] - source_only["val_target_top_share"]
    if growth > share_margin:
        return (f"{row['val_target_top_share']:.0%} of the val target images given one "
                f"class, more than {share_margin:.0%} above source-only's")
    return None


def choose(rows, evidence=EVIDENCE, accuracy_margin=ACCURACY_MARGIN,
           share_margin=SHARE_MARGIN):
    """The trial the rule chooses, and why, in words.

    Returns:
        (row, reason); row is None when no trial was scored. Without a scored
        source-only trial, the DANN trial best by `evidence` is chosen, and the reason
        says it could not be compared.
    """
    scored = completed(rows)
    source_only = best_by([row for row in scored if row["mode"] == "source_only"],
                          evidence)
    dann = [row for row in scored if row["mode"] != "source_only"]
    if source_only is None:
        chosen = best_by(dann, evidence)
        return chosen, (None if chosen is None else
                        f"chose trial {chosen['trial']} (best on "
                        f"{' and '.join(evidence)}): no source-only trial was scored to "
                        "compare it with")
    qualified = [row for row in dann if falls_short(
        row, source_only, evidence, accuracy_margin, share_margin) is None]
    if not qualified:
        return source_only, (f"kept source-only (trial {source_only['trial']}): no "
                             f"DANN trial beat it on {' and '.join(evidence)} within "
                             "the source-accuracy and class-share margins")
    chosen = best_by(qualified, evidence)
    return chosen, (f"chose trial {chosen['trial']} ({chosen['mode']}): above "
                    f"source-only (trial {source_only['trial']}) on "
                    f"{' and '.join(evidence)}, val source accuracy "
                    f"{chosen['val_source_accuracy']:.4f} against "
                    f"{source_only['val_source_accuracy']:.4f}; best of "
                    f"{len(qualified)} DANN trials that qualified")
