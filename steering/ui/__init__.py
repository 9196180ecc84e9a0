"""Everything that imports gradio: the page (app.py), one module per tab, the client endpoints
(endpoints.py), what the tabs share (common.py), the pure conversions and pictures (views.py,
plots.py) and the server's queue and guards (serving.py). Nothing outside this package imports
gradio."""

from steering.ui.app import UIConfig, build_demo

__all__ = ["UIConfig", "build_demo"]
