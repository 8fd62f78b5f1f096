"""The summary a stage script prints when it has published: rows in, kept, set aside by reason, bytes,
seconds (from the stage's manifest)."""


def print_summary(manifest):
    """The closing one-screen summary: rows in / out / set aside by reason, bytes, seconds."""
    print(f"\n{manifest['script']} -> {manifest['stage']}/ done in {manifest['seconds']:.1f}s")
    accounting = manifest["accounting"]
    if accounting:
        print(f"  {'rows of':<28}{'in':>12}{'kept':>12}{'set aside':>12}{'dup dropped':>13}")
        for source, counts in accounting.items():
            set_aside = sum(counts.get("set_aside", {}).values())
            print(f"  {source:<28}{counts['rows_in']:>12,}{counts['kept']:>12,}{set_aside:>12,}"
                  f"{counts.get('duplicates_dropped', 0):>13,}")
            for reason, count in sorted(counts.get("set_aside", {}).items()):
                print(f"  {'':<28}{'':>12}{'':>12}{count:>12,}  {reason}")
            if counts.get("exact_duplicates_kept"):
                print(f"  {'':<28}exact duplicates kept (repeated actions are signal): "
                      f"{counts['exact_duplicates_kept']:,}")
                for action_source, count in manifest.get("exact_duplicate_actions", {}).items():
                    print(f"  {'':<28}{count:>12,}  of {action_source}")
    total_bytes = 0
    for table, described in manifest["tables"].items():
        total_bytes += described["bytes"]
        print(f"  wrote {table:<26}{described['rows']:>12,} rows {described['files']:>6} files "
              f"{described['bytes'] / 2**20:>10.1f} MiB")
    for table, groups in manifest.get("row_group_mib_in_memory", {}).items():
        print(f"  {table} row groups in memory: {groups['min']:.1f} / {groups['median']:.1f} / {groups['max']:.1f} MiB "
              f"(min / median / max of {groups['count']})")
    print(f"  {total_bytes / 2**20:.1f} MiB written in {manifest['seconds']:.1f}s", flush=True)
