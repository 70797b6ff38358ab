"""Reports: tables (Markdown, CSV, LaTeX) aggregated from result JSONs."""
