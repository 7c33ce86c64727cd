"""Sphinx configuration for the metatrain-symmetry documentation."""

from chemiscope.sphinx import ChemiscopeScraper

import metatrain_symmetry


project = "metatrain-symmetry"
author = "metatrain-symmetry developers"
copyright = "metatrain-symmetry developers"
version = metatrain_symmetry.__version__
release = metatrain_symmetry.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
    # embeds the chemiscope widgets that examples show
    "chemiscope.sphinx",
]

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"

# every script in examples/ is executed and rendered into docs/src/examples/

sphinx_gallery_conf = {
    "examples_dirs": "../../examples",
    "gallery_dirs": "examples",
    "filename_pattern": "/",
    "within_subsection_order": "FileNameSortKey",
    "remove_config_comments": True,
    "min_reported_time": 5,
    "image_scrapers": ("matplotlib", ChemiscopeScraper()),
}

html_theme = "furo"
html_title = "metatrain-symmetry"
html_static_path = []
