"""The run page, ``index.html`` in the run folder (docs/run-page.md): one self-contained HTML file
drawn from the run folder alone, by the job as it runs and by ``status --html`` on a laptop.
Imports no torch, numpy or matplotlib: its charts are SVG written from the numbers."""
