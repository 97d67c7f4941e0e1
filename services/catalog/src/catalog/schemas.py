"""Request and response bodies. `Product` carries every rule the design states."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    computed_field,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from typing_extensions import TypedDict

from catalog.models import NAME_MAX, SLUG_MAX, TAG_MAX

CENT = Decimal("0.01")
TAX_RATE = Decimal("1.1")
SALE_TAG = "sale"
SALE_PRICE_MAX = Decimal(100)
TAGS_MAX = 16
PRICE_DIGITS = 10


def _tag_fits(tag: str) -> str:
    """A tag's length, counted lower-cased as it is stored: a few letters grow
    when lower-cased (`"İ"` -> `"i̇"`), and the length constraint counts first."""
    if len(tag) > TAG_MAX:
        raise PydanticCustomError("string_too_long", f"A tag must be at most {TAG_MAX} characters")
    return tag


Tag = Annotated[
    str,
    StringConstraints(strip_whitespace=True, to_lower=True, min_length=1, max_length=TAG_MAX),
    AfterValidator(_tag_fits),
]
Slug = Annotated[
    str,
    StringConstraints(max_length=SLUG_MAX, pattern=r"^[a-z0-9]+(?:-[a-z0-9]+)*$"),
]


def price_with_tax(price: Decimal) -> Decimal:
    return (price * TAX_RATE).quantize(CENT, rounding=ROUND_HALF_UP)


def title_case_name(name: str) -> str:
    """No digits anywhere; stored title-cased (`"red apple"` -> `"Red Apple"`)."""
    if any(character.isdigit() for character in name):
        raise PydanticCustomError("name_has_digits", "Name must not contain digits")
    titled = name.title()
    if len(titled) > NAME_MAX:  # a few letters grow when title-cased ("ß" -> "Ss")
        raise PydanticCustomError("string_too_long", f"Name must be at most {NAME_MAX} characters")
    return titled


def distinct_tags(tags: list[str]) -> list[str]:
    return list(dict.fromkeys(tags))


def field_error(field: str, kind: str, message: str, value: object) -> ValidationError:
    """A validation error located at `field`, for rules checked on the whole model."""
    detail = InitErrorDetails(type=PydanticCustomError(kind, message), loc=(field,), input=value)
    return ValidationError.from_exception_data("Product", [detail])


def check_sale_price(tags: list[str], price: Decimal) -> None:
    if SALE_TAG in tags and price > SALE_PRICE_MAX:
        raise field_error(
            "price", "sale_price_too_high", "A product tagged 'sale' must cost at most 100", price
        )


class Product(BaseModel):
    """A product's own fields and rules, shared by what clients send and receive."""

    model_config = ConfigDict(str_strip_whitespace=True, extra="forbid")

    name: str = Field(min_length=2, max_length=NAME_MAX, examples=["Red Apple"])
    price: Decimal = Field(gt=0, max_digits=PRICE_DIGITS, decimal_places=2, examples=["19.99"])
    tags: list[Tag] = Field(default_factory=list, max_length=TAGS_MAX)

    @field_validator("name")
    @classmethod
    def _title_case(cls, name: str) -> str:
        return title_case_name(name)

    @field_validator("price")
    @classmethod
    def _two_places(cls, price: Decimal) -> Decimal:
        return price.quantize(CENT)

    @field_validator("tags")
    @classmethod
    def _distinct(cls, tags: list[str]) -> list[str]:
        return distinct_tags(tags)

    @model_validator(mode="after")
    def _sale_price(self) -> Self:
        check_sale_price(self.tags, self.price)
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def price_with_tax(self) -> Decimal:
        return price_with_tax(self.price)


class ProductIn(Product):
    """`POST` body; `category` is a category's slug."""

    category: Slug | None = None


class ProductPatch(BaseModel):
    """`PATCH` body: only the fields sent are applied; `category: null` removes it."""

    model_config = ConfigDict(str_strip_whitespace=True, extra="forbid")

    name: str | None = Field(default=None, min_length=2, max_length=NAME_MAX)
    price: Decimal | None = Field(default=None, gt=0, max_digits=PRICE_DIGITS, decimal_places=2)
    tags: list[Tag] | None = Field(default=None, max_length=TAGS_MAX)
    category: Slug | None = None

    @field_validator("name")
    @classmethod
    def _title_case(cls, name: str | None) -> str | None:
        return None if name is None else title_case_name(name)

    @field_validator("tags")
    @classmethod
    def _distinct(cls, tags: list[str] | None) -> list[str] | None:
        return None if tags is None else distinct_tags(tags)

    @model_validator(mode="after")
    def _required_not_null(self) -> Self:
        for field in ("name", "price", "tags"):
            if field in self.model_fields_set and getattr(self, field) is None:
                raise field_error(field, "not_nullable", f"{field} cannot be null", None)
        return self

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


class CategoryIn(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True, extra="forbid")

    slug: Slug = Field(examples=["fruit"])
    name: str = Field(min_length=1, max_length=NAME_MAX, examples=["Fruit"])


class CategoryOut(BaseModel):
    id: int
    slug: str
    name: str


class ProductOut(Product):
    model_config = ConfigDict(extra="ignore")

    id: uuid.UUID
    category: CategoryOut | None
    version: int
    created_at: datetime
    updated_at: datetime


class ProductPage(BaseModel):
    items: list[ProductOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


class CategoryRecord(TypedDict):
    id: int
    slug: str
    name: str


class ProductRecord(TypedDict):
    """A `ProductOut` as a plain dict, in the same order and serialised the
    same way: a list page builds twenty of these from rows the database
    already holds valid, where twenty models would cost more than the query."""

    name: str
    price: Decimal
    tags: list[str]
    id: uuid.UUID
    category: CategoryRecord | None
    version: int
    created_at: datetime
    updated_at: datetime
    price_with_tax: Decimal


class ProductPageRecord(TypedDict):
    """A `ProductPage` of `ProductRecord`s."""

    items: list[ProductRecord]
    next_cursor: str | None


PRODUCT_PAGE_JSON: TypeAdapter[ProductPageRecord] = TypeAdapter(ProductPageRecord)


class ImportResult(BaseModel):
    count: int
    ids: list[uuid.UUID]
