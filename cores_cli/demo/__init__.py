"""``cores demo``: a local web page around one loaded model (Gradio, the ``demo`` extra).

``session.py`` answers a request without any web library (tested directly); ``app.py`` puts
it behind a Gradio page. The model is loaded once per server; requests queue for it.
"""
