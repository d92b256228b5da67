"""Random tiny models that tests and benchmarks build offline in seconds (a diffusers SD + ControlNet folder,
VLM parts on the shapes data). The library itself never imports this package."""
