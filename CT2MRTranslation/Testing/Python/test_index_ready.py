"""What the 3D Slicer Extensions Index's validator checks (its scripts/check_description_files.py): the description
file against the catalog entry schema, the category, the names, the top-level CMakeLists.txt metadata (icon and
screenshot URLs, contributors, description), and the licence file.

``data/slicer-extension-catalog-entry-schema-v1.0.2.json`` is Slicer's schema (Slicer/Slicer, Schemas/), kept here so
that the test needs no network.
"""

from __future__ import annotations

import json
import re

import jsonschema
from CT2MRTranslationTestHelpers import MODULE_DIR, REPO_ROOT, TESTS_DIR

from CT2MRTranslationLib import install

DESCRIPTION_FILE = REPO_ROOT / "CT2MRTranslation.json"
CMAKE = (REPO_ROOT / "CMakeLists.txt").read_text()
ACCEPTED_CATEGORIES_SAMPLE = {"Filtering", "Image Synthesis", "Quantification", "Registration", "Segmentation",
                              "Utilities"}
"""Some of the validator's ACCEPTED_EXTENSION_CATEGORIES (the full list lives in the index)."""


def cmakeSetting(name: str) -> str:
    match = re.search(rf'set\s*\({name}\s*"([^"]+)"[ ]*\)', CMAKE)
    assert match, f"{name} is not set in the top-level CMakeLists.txt"
    return match.group(1)


def test_description_file_validates_against_the_catalog_schema():
    description = json.loads(DESCRIPTION_FILE.read_text())
    schema = json.loads((TESTS_DIR / "data" / "slicer-extension-catalog-entry-schema-v1.0.2.json").read_text())
    jsonschema.validate(description, schema)
    assert description["$schema"].split("/")[-1].startswith("slicer-extension-catalog-entry-schema-v1.0.2.json")
    assert b"\r" not in DESCRIPTION_FILE.read_bytes()  # LF line endings only
    assert description["category"] == cmakeSetting("EXTENSION_CATEGORY") in ACCEPTED_CATEGORIES_SAMPLE
    assert description["build_dependencies"] == cmakeSetting("EXTENSION_DEPENDS").split() == ["PyTorch"]
    assert description["scm_url"].startswith("https://github.com/") and description["scm_revision"]
    repository = description["scm_url"].rstrip("/").split("/")[-1]
    assert repository.startswith("Slicer") and cmakeSetting("EXTENSION_HOMEPAGE").endswith(repository)
    extension = DESCRIPTION_FILE.stem
    assert not extension.lower().startswith("slicer")
    assert re.search(r"project\s*\(\s*([^\s\)]+)", CMAKE).group(1) == extension


def rawFile(url: str):
    """The repository file a raw.githubusercontent.com URL of the description points to."""
    description = json.loads(DESCRIPTION_FILE.read_text())
    owner, repository = description["scm_url"].rstrip("/").split("/")[-2:]
    prefix = f"https://raw.githubusercontent.com/{owner}/{repository}/{description['scm_revision']}/"
    assert url.startswith(prefix), url
    return REPO_ROOT / url[len(prefix):]


def test_icon_and_screenshots_exist_in_the_repository():
    icon = rawFile(cmakeSetting("EXTENSION_ICONURL"))
    assert icon == MODULE_DIR / "Resources" / "Icons" / "CT2MRTranslation.png" and icon.is_file()
    screenshots = cmakeSetting("EXTENSION_SCREENSHOTURLS").split()
    assert len(screenshots) >= 1
    for url in screenshots:
        path = rawFile(url)
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url


def test_contributors_and_description_read_well():
    contributors = [c.strip() for c in cmakeSetting("EXTENSION_CONTRIBUTORS").split(",")]
    for contributor in contributors:
        assert re.fullmatch(r"[A-Z][\w.' -]+ \([^()]+\)", contributor), f"not 'Name (Affiliation)': {contributor}"
    assert "team" not in cmakeSetting("EXTENSION_CONTRIBUTORS").lower()
    module = (MODULE_DIR / "CT2MRTranslation.py").read_text()
    for contributor in contributors:
        assert contributor in module  # the module's contributors are the extension's
    description = cmakeSetting("EXTENSION_DESCRIPTION")
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", description) if s]
    assert 1 <= len(sentences) <= 2 and len(description) <= 300
    for jargon in ("G(x)", "F(G", "|", "UTE", "HU"):  # plain words for the catalog
        assert jargon not in description, jargon


def test_licence_file_at_the_root():
    licence = (REPO_ROOT / "LICENSE").read_text()
    assert licence.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in licence
    assert 'license = { text = "Apache-2.0" }' in (REPO_ROOT / "training" / "pyproject.toml").read_text()
    assert "Apache-2.0" in (REPO_ROOT / "README.md").read_text()


def test_the_build_refuses_unsupported_slicers():
    minimum = re.search(r'set\(CT2MRTranslation_MINIMUM_SLICER_VERSION "([\d.]+)"\)', CMAKE).group(1)
    assert tuple(int(v) for v in minimum.split(".")) == install.SUPPORTED_SLICER
    assert "VERSION_LESS CT2MRTranslation_MINIMUM_SLICER_VERSION" in CMAKE and "FATAL_ERROR" in CMAKE
