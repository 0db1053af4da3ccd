"""The partition report of a Plan: `text.render_text` (plain text) and `html.render_html` (one HTML page).

The report reads the Plan only (and the Cluster it records): never the solver or the runtimes.
"""
