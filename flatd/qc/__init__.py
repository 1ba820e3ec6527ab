"""Quality checks: every flat before it joins a group (flats), every master (masters,
previous), and the pictures that show them (previews)."""
