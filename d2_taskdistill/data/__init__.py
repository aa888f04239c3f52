from .digits import CLASS_NAMES, default_root, generate_split, write_voc_split
from .builtin import register_all_digits, register_digits_coco, register_digits_voc

register_all_digits()
