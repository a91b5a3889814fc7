package qupath.lib.objects.hierarchy

import qupath.lib.objects.PathObject
import standin.ImageState

/** STAND-IN for QuPath's PathObjectSelectionModel (not QuPath): {@code getSelectedObjects()}. */
class PathObjectSelectionModel {
    Set<PathObject> getSelectedObjects() {
        return Collections.unmodifiableSet(new LinkedHashSet<PathObject>(ImageState.get().selected()))
    }
}
