"""Label-free selection of an allocation and a repair (issue #19, docs/select.md).

    from sparse_repair.select import SelectConfig, select
    result = select(SelectConfig(model="resnet20", sparsity=0.9))
    result.choice        # {"allocation": ..., "repair": ...}
    result.to_dict()     # every candidate's label-free scores (and, with evaluate, top-1)

Modules: ``api`` (``SelectConfig``, ``select``, ``SelectResult``, ``choose``) and ``search``
(``search_allocation``, the repair-aware allocator: by default the fixed allocators first, then
the family between the two best; docs/search.md). Layering: this
package sits beside ``study`` above ``run``; nothing below it imports it.
"""

from .api import SelectConfig, SelectResult, select
from .search import SearchPoint, SearchResult, interpolate, search_allocation

__all__ = ["SearchPoint", "SearchResult", "SelectConfig", "SelectResult", "interpolate",
           "search_allocation", "select"]
