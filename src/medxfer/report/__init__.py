"""Reports: tables (Markdown, CSV, LaTeX) aggregated from result JSONs, the statistics behind
them (``stats``) and their figures (``figures_stats``)."""
