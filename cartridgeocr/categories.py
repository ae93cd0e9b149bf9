"""The two object classes, defined once. Every module imports ids and names from here."""

CASING = 1
PRIMER = 2

#: COCO category id -> name. Id 0 is reserved for background (torchvision convention).
CATEGORY_NAMES: dict[int, str] = {CASING: "casing", PRIMER: "primer"}

#: The `categories` block every COCO file written by this project carries.
COCO_CATEGORIES: list[dict] = [
    {"id": i, "name": n, "supercategory": "cartridge"} for i, n in CATEGORY_NAMES.items()
]

#: Overlay colours (RGB): casing red, primer yellow.
CATEGORY_COLORS: dict[int, tuple[int, int, int]] = {CASING: (230, 40, 40), PRIMER: (250, 210, 20)}
